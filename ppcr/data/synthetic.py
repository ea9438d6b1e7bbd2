"""The embedded RefCOCO-shaped dataset.

Procedurally drawn scenes of coloured shapes, some partly hidden behind others, with referring
expressions of graded difficulty:

- level 0, unique attributes: "the red circle", "the triangle";
- level 1, size or position among look-alikes: "the small square", "the oval on the left";
- level 2, relations to a uniquely described anchor: "the square left of the blue triangle".

Every expression is checked to pick out exactly one object of its scene. The output is real REFER
data (``refs(unc).p``, COCO ``instances.json`` with polygon segmentation of the visible part of each
object, JPEG images), so it is sharded by the same converter as RefCOCO. Like RefCOCO's
people / objects split, testA refers only to round shapes and testB only to angular ones.
Everything is a pure function of the config and its seed.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from shapely import affinity
from shapely.geometry import MultiPolygon, Point, Polygon
from shapely.ops import unary_union
from tqdm import tqdm

from ppcr.config import SyntheticConfig
from ppcr.data.refer import segmentation_to_mask

DATASET = "synthetic"
SPLIT_BY = "unc"
SPLITS = ("train", "val", "testA", "testB")

# (id, name, supercategory). testA targets the "round" supercategory, testB the "angular" one.
CATEGORIES = [
    (1, "circle", "round"),
    (2, "oval", "round"),
    (3, "square", "angular"),
    (4, "triangle", "angular"),
    (5, "star", "angular"),
    (6, "diamond", "angular"),
]
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 40),
    "purple": (135, 60, 185),
    "orange": (245, 135, 30),
}
SIZES = {"small": (0.07, 0.10), "large": (0.15, 0.21)}  # radius as a share of the shorter side
MIN_VISIBLE_PIXELS = 60.0


@dataclass
class SceneObject:
    category_id: int
    shape: str
    colour: str
    size: str
    polygon: Polygon  # full outline, before occlusion
    visible: Polygon | MultiPolygon | None = None  # what later objects leave uncovered

    @property
    def cx(self) -> float:
        return self.polygon.centroid.x

    @property
    def cy(self) -> float:
        return self.polygon.centroid.y


@dataclass
class Scene:
    width: int
    height: int
    objects: list[SceneObject]  # in drawing order: later objects cover earlier ones


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> Polygon:
    if shape == "circle":
        return Point(cx, cy).buffer(r, quad_segs=12)
    if shape == "oval":
        return affinity.rotate(affinity.scale(Point(cx, cy).buffer(r, quad_segs=12), 1.0, 0.6), angle)
    if shape == "square":
        s = r / math.sqrt(2)
        return affinity.rotate(Polygon([(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]), angle)
    if shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.radians([angle - 90, angle + 30, angle + 150])]
        return Polygon(pts)
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = math.radians(angle - 90 + 36 * k)
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return Polygon(pts)
    if shape == "diamond":
        return affinity.rotate(Polygon([(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)]), angle)
    raise ValueError(f"unknown shape {shape}")


def _parts(geom) -> list[Polygon]:
    if geom is None or geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    return [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon) and not g.is_empty]


def _acceptable_visible(obj: SceneObject, covering, max_occlusion: float) -> Polygon | MultiPolygon | None:
    """The visible part of ``obj`` under ``covering``, or None if it is too hidden or has holes.

    Slivers count too: the image shows every uncovered pixel, so the annotation must hold them."""
    vis = obj.polygon if covering is None else obj.polygon.difference(covering)
    parts = [p for p in _parts(vis) if p.area > 0]
    if not parts or any(len(p.interiors) for p in parts):
        return None
    area = sum(p.area for p in parts)
    if area < (1.0 - max_occlusion) * obj.polygon.area:
        return None
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def make_scene(rng: np.random.Generator, cfg: SyntheticConfig, focus: str | None = None) -> Scene:
    """A scene; ``focus`` (a supercategory) makes most of its shapes come from that group, as
    RefCOCO's testA images are full of people and testB images full of objects."""
    w = int(rng.integers(cfg.min_image_size, cfg.max_image_size + 1))
    h = int(rng.integers(cfg.min_image_size, cfg.max_image_size + 1))
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    # A few shapes and colours per scene, so look-alikes occur and need size, position or relations.
    if focus is None:
        shapes = rng.choice([c[1] for c in CATEGORIES], size=int(rng.integers(2, 4)), replace=False)
    else:
        group = [c[1] for c in CATEGORIES if c[2] == focus]
        rest = [c[1] for c in CATEGORIES if c[2] != focus]
        shapes = np.concatenate([rng.choice(group, size=min(2, len(group)), replace=False), rng.choice(rest, size=1)])
    colours = rng.choice(list(COLOURS), size=int(rng.integers(2, 4)), replace=False)
    cat_id = {name: cid for cid, name, _ in CATEGORIES}
    objects: list[SceneObject] = []
    for _ in range(n):
        for _attempt in range(30):
            shape = str(rng.choice(shapes))
            size = "small" if rng.random() < 0.5 else "large"
            r = float(rng.uniform(*SIZES[size])) * min(w, h)
            cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
            poly = _outline(shape, cx, cy, r, float(rng.uniform(0, 360)))
            x0, y0, x1, y1 = poly.bounds
            if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                continue
            cand = SceneObject(cat_id[shape], shape, str(rng.choice(colours)), size, poly)
            # Every earlier object must stay acceptably visible with the new one on top.
            later = [cand.polygon]
            ok = True
            for i in range(len(objects) - 1, -1, -1):
                if _acceptable_visible(objects[i], unary_union(later), cfg.max_occlusion) is None:
                    ok = False
                    break
                later.append(objects[i].polygon)
            if ok:
                objects.append(cand)
                break
    for i, obj in enumerate(objects):
        covering = unary_union([o.polygon for o in objects[i + 1:]]) if i + 1 < len(objects) else None
        obj.visible = _acceptable_visible(obj, covering, 1.0)
    return Scene(w, h, objects)


def render(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw the scene: (H, W, 3) uint8 image and (H, W) int32 label map (object index + 1, 0 = none)."""
    w, h = scene.width, scene.height
    base = rng.uniform(90, 200, size=3)
    grad = np.linspace(-25, 25, w)[None, :, None] * rng.choice([-1, 1])
    img = np.clip(base[None, None, :] + grad + rng.normal(0, 6, size=(h, w, 3)), 0, 255).astype(np.uint8)
    labels = np.zeros((h, w), dtype=np.int32)
    for i, obj in enumerate(scene.objects):
        # Rasterised like the annotations (pycocotools), so drawn pixels and masks agree.
        inside = segmentation_to_mask(coco_polygons(obj.polygon), h, w).astype(bool)
        colour = np.clip(np.array(COLOURS[obj.colour]) + rng.integers(-15, 16, size=3), 0, 255)
        img[inside] = colour.astype(np.uint8)
        labels[inside] = i + 1
    return img, labels


# ---------------------------------------------------------------------------------------------
# Referring expressions
# ---------------------------------------------------------------------------------------------


def _is_target_category(obj: SceneObject, split: str) -> bool:
    sup = {cid: s for cid, _, s in CATEGORIES}[obj.category_id]
    return {"testA": sup == "round", "testB": sup == "angular"}.get(split, True)


def _unique_descriptions(obj: SceneObject, objs: list[SceneObject]) -> list[str]:
    """Level-0 phrases (without article) that pick out ``obj`` alone in ``objs``."""
    out = []
    if sum(o.shape == obj.shape for o in objs) == 1:
        out.append(obj.shape)
    if sum(o.shape == obj.shape and o.colour == obj.colour for o in objs) == 1:
        out.append(f"{obj.colour} {obj.shape}")
    return out


def _relation(a: SceneObject, b: SceneObject, margin_x: float, margin_y: float) -> list[str]:
    """Spatial relations that hold from a to b with a clear margin."""
    rel = []
    if a.cx + margin_x < b.cx:
        rel.append("left of")
    if a.cx > b.cx + margin_x:
        rel.append("right of")
    if a.cy + margin_y < b.cy:
        rel.append("above")
    if a.cy > b.cy + margin_y:
        rel.append("below")
    return rel


def expressions(scene: Scene, t: int) -> dict[int, list[str]]:
    """Every expression of each difficulty level that refers to object ``t`` and to no other."""
    objs = scene.objects
    obj = objs[t]
    mx, my = 0.08 * scene.width, 0.08 * scene.height
    levels: dict[int, list[str]] = {0: [], 1: [], 2: []}
    levels[0] = [f"the {d}" for d in _unique_descriptions(obj, objs)]

    # Level 1: look-alikes told apart by size or by an extreme position.
    for noun, group in ((obj.shape, [o for o in objs if o.shape == obj.shape]),
                        (f"{obj.colour} {obj.shape}", [o for o in objs if o.shape == obj.shape and o.colour == obj.colour])):
        if len(group) < 2:
            continue
        if sum(o.size == obj.size for o in group) == 1:
            levels[1].append(f"the {obj.size} {noun}")
        others = [o for o in group if o is not obj]
        if all(obj.cx + mx < o.cx for o in others):
            levels[1] += [f"the {noun} on the left", f"the leftmost {noun}"]
        if all(obj.cx > o.cx + mx for o in others):
            levels[1] += [f"the {noun} on the right", f"the rightmost {noun}"]
        if all(obj.cy + my < o.cy for o in others):
            levels[1].append(f"the {noun} at the top")
        if all(obj.cy > o.cy + my for o in others):
            levels[1].append(f"the {noun} at the bottom")

    # Level 2: a relation to an anchor that has a unique description of its own.
    same_shape = [i for i, o in enumerate(objs) if o.shape == obj.shape]
    if len(same_shape) >= 2:
        for a, anchor in enumerate(objs):
            if a == t:
                continue
            for desc in _unique_descriptions(anchor, objs):
                for rel in _relation(obj, anchor, mx, my):
                    holders = [i for i in same_shape if i != a and rel in _relation(objs[i], anchor, mx, my)]
                    if holders == [t]:
                        levels[2].append(f"the {obj.shape} {rel} the {desc}")
    for k in levels:
        levels[k] = list(dict.fromkeys(levels[k]))
    return levels


def _choose_sentences(rng: np.random.Generator, levels: dict[int, list[str]], weights: list[float],
                      n: int) -> list[tuple[str, int]]:
    """Up to ``n`` (sentence, level) pairs: a level drawn by ``weights``, its sentences first, then others."""
    avail = [k for k in (0, 1, 2) if levels[k] and weights[k] > 0]
    if not avail:
        return []
    p = np.array([weights[k] for k in avail], dtype=float)
    level = avail[int(rng.choice(len(avail), p=p / p.sum()))]
    pool = [(s, level) for s in levels[level]]
    rng.shuffle(pool)
    extra = [(s, k) for k in avail if k != level for s in levels[k]]
    rng.shuffle(extra)
    return (pool + extra)[:n]


# ---------------------------------------------------------------------------------------------
# REFER files
# ---------------------------------------------------------------------------------------------


def coco_polygons(geom) -> list[list[float]]:
    """COCO polygon segmentation: one flat [x1, y1, x2, y2, ...] list per visible part."""
    out = []
    for part in _parts(geom):
        coords = list(part.exterior.coords)[:-1]
        out.append([round(float(v), 2) for xy in coords for v in xy])
    return out


def image_plan(cfg: SyntheticConfig) -> list[tuple[str, int, int]]:
    """(split, index within the split, image_id) of every image, image ids counting from 1."""
    plan = []
    for split in SPLITS:
        for index in range(cfg.num_images.get(split, 0)):
            plan.append((split, index, len(plan) + 1))
    return plan


def draw_image(cfg: SyntheticConfig, split: str, index: int) -> tuple[Scene, np.ndarray, np.ndarray, np.random.Generator]:
    """The scene of one image, its pixels and label map, and the generator to go on drawing from."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    scene = make_scene(rng, cfg, {"testA": "round", "testB": "angular"}.get(split))
    pixels, labels = render(scene, rng)
    return scene, pixels, labels, rng


def _image_job(args) -> dict:
    """Generate, draw and save one image; return its COCO image, annotations and refs (no ids yet)."""
    cfg, split, index, image_id, image_dir = args
    scene, pixels, _, rng = draw_image(cfg, split, index)
    file_name = f"{DATASET}_{image_id:012d}.jpg"
    Image.fromarray(pixels).save(Path(image_dir) / file_name, quality=cfg.jpeg_quality)
    anns, refs = [], []
    for k, obj in enumerate(scene.objects):
        if obj.visible is None:
            continue
        x0, y0, x1, y1 = obj.visible.bounds
        anns.append({
            "id": image_id * 100 + k,
            "image_id": image_id,
            "category_id": obj.category_id,
            "segmentation": coco_polygons(obj.visible),
            "area": round(float(obj.visible.area), 2),
            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
            "iscrowd": 0,
        })
    order = rng.permutation(len(scene.objects))
    for k in order:
        obj = scene.objects[int(k)]
        if len(refs) >= cfg.refs_per_image:
            break
        if obj.visible is None or obj.visible.area < MIN_VISIBLE_PIXELS or not _is_target_category(obj, split):
            continue
        sents = _choose_sentences(rng, expressions(scene, int(k)), cfg.difficulty_weights, cfg.sentences_per_ref)
        if sents:
            refs.append({"ann_id": image_id * 100 + int(k), "image_id": image_id,
                         "category_id": obj.category_id, "split": split, "sentences": sents})
    image = {"id": image_id, "file_name": file_name, "height": scene.height, "width": scene.width}
    return {"image": image, "annotations": anns, "refs": refs}


def generate(cfg: SyntheticConfig, refer_root: str | Path, images_root: str | Path, workers: int = 2) -> dict:
    """Write ``<refer_root>/synthetic/{refs(unc).p, instances.json}`` and the JPEGs under
    ``<images_root>/synthetic/``. Returns counts per split."""
    ref_dir = Path(refer_root) / DATASET
    image_dir = Path(images_root) / DATASET
    ref_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(cfg, split, index, image_id, str(image_dir)) for split, index, image_id in image_plan(cfg)]
    images, annotations, refs = [], [], []
    pool = mp.get_context().Pool(workers) if workers > 1 else None  # the platform default: fork on Linux
    try:
        results = pool.imap(_image_job, jobs, chunksize=8) if pool else map(_image_job, jobs)
        for res in tqdm(results, total=len(jobs), desc="synthetic images", unit="img"):
            images.append(res["image"])
            annotations.extend(res["annotations"])
            refs.extend(res["refs"])
    finally:
        if pool:
            pool.close()
            pool.join()
    sent_id = 0
    for ref_id, ref in enumerate(refs):
        sentences = []
        for raw, level in ref.pop("sentences"):
            # "level" is this set's own field (REFER's sentences have none): the expression group
            # evaluation reports by (ppcr.data.refer.expression_group)
            sentences.append({"tokens": raw.split(), "raw": raw, "sent": raw, "sent_id": sent_id, "level": level})
            sent_id += 1
        ref.update({
            "ref_id": ref_id,
            "sent_ids": [s["sent_id"] for s in sentences],
            "sentences": sentences,
            "file_name": f"{DATASET}_{ref['image_id']:012d}_{ref['ann_id']}.jpg",
        })
    instances = {
        "info": {"description": "ppcr synthetic RefCOCO-shaped dataset", "seed": cfg.seed},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup in CATEGORIES],
    }
    (ref_dir / "instances.json").write_text(json.dumps(instances))
    with open(ref_dir / f"refs({SPLIT_BY}).p", "wb") as f:
        pickle.dump(refs, f, protocol=4)
    counts: dict[str, dict[str, int]] = {s: {"images": 0, "refs": 0, "sentences": 0} for s in SPLITS}
    for split, _, _ in image_plan(cfg):
        counts[split]["images"] += 1
    for r in refs:
        counts[r["split"]]["refs"] += 1
        counts[r["split"]]["sentences"] += len(r["sentences"])
    return counts
