"""SAM for PPCR: segment_anything's model, loaded from a local checkpoint, prompted by a box and SemSP.

One builder, :func:`build_sam`, makes every size from an architecture spec (:class:`ppcr.config.SamArchConfig`):
the released vit_b / vit_l / vit_h are the specs of segment_anything's own registry (:data:`SAM_ARCHS`, tested
equal to it), the tiny one is ``model.sam_arch``. All load the same way (a plain state_dict). Image
preprocessing is :class:`ppcr.data.transforms.Preprocessor`, checked here against SAM's own pixel mean and std
so that the two cannot drift apart.
"""

from __future__ import annotations

import pickle
import sys
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from ppcr.config import ModelConfig, SamArchConfig
from ppcr.data.transforms import frame_region

# The released SAM checkpoints: file name and published md5 (segment_anything's README links them).
SAM_RELEASES = {
    "vit_h": ("sam_vit_h_4b8939.pth", "4b8939a88964f0f4ff5f5b2642c598a6"),
    "vit_l": ("sam_vit_l_0b3195.pth", "0b3195507c641ddb6910d2bb5adee89c"),
    "vit_b": ("sam_vit_b_01ec64.pth", "01ec64d29a2fca3f0661936605ae66f8"),
}


# segment_anything's build_sam_vit_b / _l / _h, as specs (image size 1024 for all three).
_RELEASED = dict(patch_size=16, window_size=14, prompt_dim=256, decoder_heads=8, decoder_mlp_dim=2048)
SAM_ARCHS = {
    "vit_b": SamArchConfig(
        encoder_dim=768, encoder_depth=12, encoder_heads=12, global_attn_indexes=[2, 5, 8, 11], **_RELEASED
    ),
    "vit_l": SamArchConfig(
        encoder_dim=1024, encoder_depth=24, encoder_heads=16, global_attn_indexes=[5, 11, 17, 23], **_RELEASED
    ),
    "vit_h": SamArchConfig(
        encoder_dim=1280, encoder_depth=32, encoder_heads=16, global_attn_indexes=[7, 15, 23, 31], **_RELEASED
    ),
}


def sam_arch(cfg: ModelConfig) -> SamArchConfig:
    """The architecture ``model.sam_type`` names: a released size's, or ``model.sam_arch`` for tiny."""
    return cfg.sam_arch if cfg.sam_type == "tiny" else SAM_ARCHS[cfg.sam_type]


def build_sam(arch: SamArchConfig, image_size: int) -> Sam:
    """A randomly initialised SAM of segment_anything's own classes, laid out as its ``_build_sam`` lays them
    (which fixes the sizes and 1024 px; here they come from ``arch`` and ``image_size``)."""
    grid = image_size // arch.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(arch.global_attn_indexes),
            window_size=arch.window_size,
            out_chans=arch.prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=arch.prompt_dim,
                mlp_dim=arch.decoder_mlp_dim or 2 * arch.prompt_dim,
                num_heads=arch.decoder_heads,
            ),
            transformer_dim=arch.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.prompt_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def check_sam_checkpoint(cfg: ModelConfig) -> Path:
    path = Path(cfg.sam_checkpoint)
    if not path.is_file():
        if cfg.sam_type == "tiny":
            hint = "'make models' or 'ppcr-tiny --config <recipe>'"
        else:
            name, md5 = SAM_RELEASES[cfg.sam_type]
            hint = (
                f"Meta's SAM {cfg.sam_type}: https://dl.fbaipublicfiles.com/segment_anything/{name} (md5 {md5}; "
                "README, 'Real data and weights')"
            )
        raise FileNotFoundError(f"model.sam_checkpoint: no SAM checkpoint at {path}; get {hint}")
    return path


def load_sam(cfg: ModelConfig) -> Sam:
    path = check_sam_checkpoint(cfg)
    try:
        sam = build_sam(sam_arch(cfg), cfg.sam_image_size)
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            with open(path, "rb") as f:  # as segment_anything's _build_sam does, but never unpickling code
                state = torch.load(f, map_location="cpu", weights_only=True)
        sam.load_state_dict(state)
    except pickle.UnpicklingError as e:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(
            f"SAM checkpoint {path} holds more than weights, so it is not loaded (it could run "
            f"code): {str(e).strip().splitlines()[-1]}"
        ) from e
    except RuntimeError as e:  # load_state_dict: missing / unexpected keys, shape mismatches
        first = str(e).strip().splitlines()[:4]
        raise ValueError(
            f"SAM checkpoint {path} does not fit model.sam_type '{cfg.sam_type}'"
            f"{' and model.sam_arch' if cfg.sam_type == 'tiny' else ''}: {' '.join(first)}"
        ) from e
    mean, std = sam.pixel_mean.flatten().tolist(), sam.pixel_std.flatten().tolist()
    if not (
        torch.allclose(torch.tensor(mean), torch.tensor(cfg.sam_pixel_mean))
        and torch.allclose(torch.tensor(std), torch.tensor(cfg.sam_pixel_std))
    ):
        raise ValueError(
            f"model.sam_pixel_mean/std {cfg.sam_pixel_mean}/{cfg.sam_pixel_std} differ from the SAM "
            f"checkpoint's {mean}/{std}"
        )
    if sam.image_encoder.img_size != cfg.sam_image_size:
        raise ValueError(
            f"model.sam_image_size {cfg.sam_image_size} differs from the SAM encoder's {sam.image_encoder.img_size}"
        )
    return sam


def save_sam_state(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """A SAM state dict in the layout of Meta's checkpoints: ``torch.save`` for ``.pth``, safetensors for
    ``.safetensors`` (how SAM checkpoints are also published); :func:`load_sam` reads both."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.detach().contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


class SamSegmenter(nn.Module):
    """SAM's encoder, prompt encoder and mask decoder, with SemSP as one more sparse prompt token."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam
        # SAM's prompt encoder reads its child embeddings' weights directly instead of calling them. Under
        # ZeRO-3 those weights must be gathered with the prompt encoder, also outside the engine's forward
        # (validation, prediction); elsewhere this is inert. Training loads DeepSpeed before it builds the
        # model; inference and export never import it, so there is nothing to register there.
        deepspeed = sys.modules.get("deepspeed")
        if deepspeed is not None:
            pe = sam.prompt_encoder
            for child in (*pe.point_embeddings, pe.not_a_point_embed, pe.no_mask_embed):
                deepspeed.zero.register_external_parameter(pe, child.weight)

    def _apply(self, fn, recurse: bool = True):
        """Casts (``.to(bfloat16)``, DeepSpeed's bf16 and fp16 engines) leave SAM's random Fourier features of
        prompt coordinates in fp32: in bf16 (8-bit mantissa) a box corner in SAM's 1024-px frame would move by
        up to 4 px, and segment_anything multiplies fp32 coordinates by that matrix."""
        super()._apply(fn, recurse)
        pe = self.sam.prompt_encoder.pe_layer
        pe.positional_encoding_gaussian_matrix = pe.positional_encoding_gaussian_matrix.float()
        return self

    @property
    def prompt_dim(self) -> int:
        return self.sam.prompt_encoder.embed_dim

    def normalize(self, images: torch.Tensor, input_sizes: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 images, zero-padded right and bottom, -> SAM's input: pixel mean and std
        inside each image, zero in the padding, as segment_anything's ``Sam.preprocess``."""
        mean, std = self.sam.pixel_mean, self.sam.pixel_std  # (3, 1, 1) buffers, on the model's device
        x = (images.float() - mean.float()) / std.float()
        return (x * frame_region(input_sizes, images.shape[-1])[:, None]).to(mean.dtype)

    def encode(self, images: torch.Tensor, input_sizes: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 images (see :meth:`normalize`) -> (B, C, S/16, S/16); no graph when the
        encoder is frozen."""
        x = self.normalize(images, input_sizes)
        trainable = any(p.requires_grad for p in self.sam.image_encoder.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            return self.sam.image_encoder(x)

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor | None, sem: torch.Tensor | None) -> torch.Tensor:
        """Low-resolution mask logits (B, S/4, S/4) for boxes (B, 4) in SAM's input frame (x1, y1, x2, y2
        pixels) and/or SemSP tokens (B, C).

        SAM's ``MaskDecoder.forward`` takes one image with many prompts; PPCR has one prompt set per
        image, so this runs the decoder's own modules over the B images at once, as ``predict_masks``
        does for one image, and computes only the mask that ``multimask_output=False`` returns."""
        b = embeddings.shape[0]
        pe, md = self.sam.prompt_encoder, self.sam.mask_decoder
        sparse, dense = pe(points=None, boxes=boxes, masks=None)  # (B or 1, n, C), (B or 1, C, h, w)
        dtype = embeddings.dtype  # the prompt encoding is fp32 (see _apply); the decoder runs in the model's dtype
        sparse, dense = sparse.expand(b, -1, -1).to(dtype), dense.expand(b, -1, -1, -1).to(dtype)
        if sem is not None:
            sparse = torch.cat([sparse, sem[:, None].to(sparse.dtype)], dim=1)
        # The output tokens (IoU, then the masks') through the embeddings' forward, so that ZeRO-3 gathers them.
        index = torch.arange(md.num_mask_tokens, device=embeddings.device)
        output_tokens = torch.cat([md.iou_token(index[:1]), md.mask_tokens(index)], dim=0)  # (1 + masks, C)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        src = embeddings + dense
        pos = pe.get_dense_pe().expand(b, -1, -1, -1).to(dtype)
        hs, src = md.transformer(src, pos, tokens)  # (B, tokens, C), (B, h*w, C)
        _, c, h, w = embeddings.shape
        upscaled = md.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
        hyper = md.output_hypernetworks_mlps[0](hs[:, 1, :])  # (B, C/8): the first mask token
        _, c8, h4, w4 = upscaled.shape
        return (hyper.unsqueeze(1) @ upscaled.reshape(b, c8, h4 * w4)).reshape(b, h4, w4)

    def to_original(
        self, low: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """(S/4, S/4) logits -> (H, W) logits at the image's original resolution (SAM's postprocessing)."""
        return self.sam.postprocess_masks(low[None, None], tuple(input_size), tuple(original_size))[0, 0]
