import itertools
import json

import pytest
import torch
from conftest import make_config, train_set

from ppcr.data.shards import iter_tar_samples, load_manifest
from ppcr.data.stream import SetReader, ShardSet, _Errors, build_eval_loader, build_train_loader, choose_expression


def split_keys(shards_dir, split):
    return [
        raw["__key__"]
        for s in load_manifest(shards_dir)["splits"][split]["shards"]
        for raw in iter_tar_samples(shards_dir / s["name"])
    ]


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_slots_are_disjoint_and_cover_every_sample_once_per_epoch(tiny_shards):
    everything = sorted(split_keys(tiny_shards, "train"))
    ss = ShardSet.open(tiny_shards.parent, train_set(tiny_shards))
    world, workers = 2, 2
    per_epoch = {0: [], 1: []}
    for rank, worker in itertools.product(range(world), range(workers)):
        slot = rank * workers + worker
        reader = SetReader(
            ss, set_index=0, seed=5, slot=slot, num_slots=world * workers, shuffle_buffer=8, errors=_Errors(), epochs=2
        )
        keys = [(r["__epoch__"], r["__key__"]) for r in reader]
        assert keys, "every slot gets shards"
        for epoch, key in keys:
            per_epoch[epoch].append((slot, key))
    for pairs in per_epoch.values():
        assert sorted(k for _, k in pairs) == everything  # every sample once, none twice
    # Shards move between slots from one epoch to the next.
    assert {k for s, k in per_epoch[0] if s == 0} != {k for s, k in per_epoch[1] if s == 0}


def test_two_ranks_with_two_workers_see_disjoint_batches(tiny_shards):
    cfg = make_config(tiny_shards, "data.num_workers=2")
    seen = []
    for rank in range(2):
        batches = take(build_train_loader(cfg, rank, 2), 6)  # 3 batches of 3 per worker: inside epoch 0
        keys = [k for b in batches for k in b["keys"]]
        assert len(keys) == len(set(keys)) == 18
        seen.append(set(keys))
    assert not seen[0] & seen[1]


def test_same_seed_same_batches_other_seed_other_order(tiny_shards):
    cfg = make_config(tiny_shards)
    a, b = take(build_train_loader(cfg, 0, 1), 5), take(build_train_loader(cfg, 0, 1), 5)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and x["expressions"] == y["expressions"]
        assert torch.equal(x["sam_images"], y["sam_images"]) and torch.equal(x["boxes"], y["boxes"])
    c = take(build_train_loader(make_config(tiny_shards, "train.seed=1"), 0, 1), 5)
    assert [x["keys"] for x in a] != [x["keys"] for x in c]


@pytest.mark.parametrize("workers,stop", [(0, 4), (2, 5), (2, 6)])
def test_resume_continues_with_the_batches_an_uninterrupted_run_sees(tiny_shards, workers, stop):
    cfg = make_config(tiny_shards, f"data.num_workers={workers}")
    total = 10
    full = take(build_train_loader(cfg, 1, 2), total)

    first = build_train_loader(cfg, 1, 2)
    head = take(first, stop)
    state = first.state_dict()
    assert state["batches"] == stop

    resumed = build_train_loader(cfg, 1, 2)
    resumed.load_state_dict(state)
    tail = take(resumed, total - stop)
    for x, y in zip(head + tail, full):
        assert x["keys"] == y["keys"] and x["expressions"] == y["expressions"]
        assert torch.equal(x["flipped"], y["flipped"]) and torch.equal(x["sam_images"], y["sam_images"])
    assert resumed.state_dict()["batches"] == total


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_a_late_step_is_exact_and_reads_no_more_than_at_an_early_one(tiny_shards, monkeypatch, workers):
    """A resume seeks: it reads the shards that hold the shuffle buffer and the current shard, bounded
    by one epoch of the slot, where replaying would read every sample since step 0."""
    from ppcr.data import stream

    cfg = make_config(tiny_shards, f"data.num_workers={workers}")
    per_epoch = load_manifest(tiny_shards)["splits"]["train"]["samples"]
    late = 4 * per_epoch // 3  # 3 samples a batch on rank 1 of 2: four epochs of this rank's slots
    full = take(build_train_loader(cfg, 1, 2), late + 3)
    reads, counting_now = {}, []
    if workers == 0:  # in-process: count what the resumed stream reads before its first batch
        real = stream.shard_samples

        def counting(path, errors):
            for raw in real(path, errors):
                if counting_now:
                    reads[current] += 1
                yield raw

        monkeypatch.setattr(stream, "shard_samples", counting)
    for current in (3, late):
        reads[current] = 0
        first = build_train_loader(cfg, 1, 2)
        head = take(first, current)
        resumed = build_train_loader(cfg, 1, 2)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as the checkpoint stores it
        counting_now.append(True)
        tail = take(resumed, 1)  # the reads up to the first batch
        counting_now.clear()
        tail += take(resumed, 2)  # a new iterator: seeks again, from the state after that batch
        for x, y in zip(head + tail, full):
            assert x["keys"] == y["keys"] and x["expressions"] == y["expressions"]
            assert torch.equal(x["flipped"], y["flipped"]) and torch.equal(x["sam_images"], y["sam_images"])
        assert tail[0]["keys"] == full[current]["keys"]
    if workers == 0:
        slot_epoch = per_epoch // 2 + 5  # a slot's half of the split, give or take a 5-sample shard
        replay = late * 3
        assert reads[late] <= slot_epoch + 3 * 3 < replay, (reads, slot_epoch, replay)
        assert reads[3] <= slot_epoch + 3 * 3, reads


def test_a_checkpoint_state_of_another_format_is_refused_naming_the_file(tiny_shards, tmp_path):
    """A checkpoint's ppcr_rank<R>.json says its format; one of another (such as those from before seeking, which
    resumed by replaying every group since step 0) is refused, with what to do instead."""
    from ppcr.train.checkpoint import STATE_VERSION, rank_states

    loader = build_train_loader(make_config(tiny_shards), 0, 1)
    take(loader, 2)
    ckpt = tmp_path / "checkpoints/step_00000002"
    ckpt.mkdir(parents=True)
    state = {"format_version": STATE_VERSION, "step": 2, "loader": loader.state_dict()}
    (ckpt / "ppcr_rank0.json").write_text(json.dumps(state))
    assert rank_states(ckpt)[0]["loader"]["batches"] == 2
    for version in (None, STATE_VERSION + 1):
        (ckpt / "ppcr_rank0.json").write_text(json.dumps({**state, "format_version": version}))
        with pytest.raises(ValueError) as e:
            rank_states(ckpt)
        assert str(e.value) == (
            f"{ckpt}/ppcr_rank0.json: format_version {version} is not {STATE_VERSION}, a "
            "checkpoint from another ppcr, which cannot resume: start a new run "
            f"(train.run_name=...), from scratch or from its weights with model.init_from={ckpt}"
        )


def test_resume_refuses_a_different_layout(tiny_shards):
    state = build_train_loader(make_config(tiny_shards, "data.num_workers=2"), 0, 2).state_dict()
    other = build_train_loader(make_config(tiny_shards, "data.num_workers=1"), 0, 2)
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(state)


def test_mixing_follows_the_ratios(tiny_shards):
    cfg = make_config(
        tiny_shards,
        f"data.train_sets=[{{name: {tiny_shards.name}, split: train, ratio: 3}}, "
        f"{{name: {tiny_shards.name}, split: val, ratio: 1}}]",
        "train.micro_batch_size=8",
    )
    val = set(split_keys(tiny_shards, "val"))
    keys = [k for b in take(build_train_loader(cfg, 0, 1), 100) for k in b["keys"]]
    share = sum(k in val for k in keys) / len(keys)
    assert abs(share - 0.25) < 0.04, share


def test_one_expression_per_ref_per_visit_drawn_from_seed_and_epoch(tiny_shards):
    sents = ["the red circle", "the circle on the left", "the small circle"]
    picks = {choose_expression(sents, 0, e, "k", 0.5) for e in range(30)}
    assert {p[0] for p in picks} == set(range(len(sents))) and {p[1] for p in picks} == {True, False}
    assert choose_expression(sents, 0, 3, "k", 0.5) == choose_expression(sents, 0, 3, "k", 0.5)
    cfg = make_config(tiny_shards, "data.flip_prob=0.0")
    for b in take(build_train_loader(cfg, 0, 1), 3):
        assert not b["flipped"].any()


def test_batches_have_the_documented_shapes(tiny_shards):
    b = take(build_train_loader(make_config(tiny_shards), 0, 1), 1)[0]
    assert b["sam_images"].shape == (3, 3, 64, 64) and b["sam_images"].dtype == torch.uint8  # normalised on the device
    assert b["mllm_images"].shape == (3, 3, 32, 32) and b["mllm_images"].dtype == torch.uint8
    assert b["sam_masks"].shape == (3, 64, 64) and b["boxes"].shape == (3, 4)
    assert all(m.shape == tuple(s) for m, s in zip(b["masks"], b["original_sizes"].tolist()))
    assert ((b["boxes"] >= 0) & (b["boxes"] <= 1)).all()
    assert len(b["expressions"]) == len(b["categories"]) == 3


def test_eval_stream_gives_every_expression_once_over_ranks(tiny_shards):
    cfg = make_config(tiny_shards, "data.num_workers=2", "eval.batch_size=4")
    manifest = load_manifest(tiny_shards)
    spec = train_set(tiny_shards, "val")
    pairs = []
    for rank in range(3):  # a rank count that divides nothing here
        for b in build_eval_loader(cfg, spec, rank, 3):
            pairs += list(zip(b["keys"], b["expressions"]))
    assert len(pairs) == len(set(pairs)) == manifest["splits"]["val"]["expressions"]


def test_too_few_shards_for_the_slots_is_a_clear_error(tiny_shards):
    cfg = make_config(tiny_shards, "data.num_workers=8")
    with pytest.raises(ValueError, match="fewer than ranks x workers"):
        build_train_loader(cfg, 0, 2)


def consumed(loaders, n):
    """(epoch, key) of every sample ``n`` batches of each loader hand out, and their states after."""
    out = []
    for loader in loaders:
        out += [(e, k) for b in take(loader, n) for e, k in zip(b["epochs"], b["keys"])]
    return out, [loader.state_dict() for loader in loaders]


def test_elastic_resume_uses_every_sample_of_an_epoch_once_over_2_then_1_then_3_ranks(tiny_shards):
    """The guarantee of ResumableLoader.load_elastic: across changes of the rank layout, no sample of an
    epoch twice and none left out (what sat in shuffle buffers is read again, not lost); and a resume on the
    new layout continues exactly. A small shuffle buffer, so that whole shards are used up before a change."""
    cfg = make_config(tiny_shards, "data.shuffle_buffer=2")
    everything = sorted(split_keys(tiny_shards, "train"))
    seen, states = consumed([build_train_loader(cfg, r, 2) for r in range(2)], 4)  # 24 samples, inside epoch 0
    workers = make_config(tiny_shards, "data.shuffle_buffer=2", "data.num_workers=2")  # and two loader workers
    one = build_train_loader(workers, 0, 1)
    one.load_elastic(states)
    more, states = consumed([one], 1)  # short: worker 1 and most of worker 0's dealt shards are not begun
    seen += more
    again = build_train_loader(workers, 0, 1)  # same layout: exact
    again.load_state_dict(states[0])
    ahead = take(one, 2)
    assert [b["keys"] for b in take(again, 2)] == [b["keys"] for b in ahead]
    seen += [(e, k) for b in ahead for e, k in zip(b["epochs"], b["keys"])]
    states = [one.state_dict()]
    three = [build_train_loader(cfg, r, 3) for r in range(3)]
    for loader in three:
        loader.load_elastic(states)
    more, _ = consumed(three, 12)  # well into epoch 1 on every rank
    seen += more
    epoch0 = sorted(k for e, k in seen if e == 0)
    epoch1 = [k for e, k in seen if e == 1]
    assert epoch0 == everything  # each once, none missing
    assert len(epoch1) == len(set(epoch1)) and epoch1
    with pytest.raises(ValueError, match="'seed' was 0 when saved and is 1 now"):
        build_train_loader(make_config(tiny_shards, "train.seed=1"), 0, 2).load_elastic(states)


def test_resume_refuses_shards_whose_content_changed(tiny_shards, tmp_path):
    """Rebuilt shards with the same names and counts give another stream: the manifest's sha256 tells."""
    import shutil

    from ppcr.data.shards import load_manifest

    copy = shutil.copytree(tiny_shards, tmp_path / tiny_shards.name)
    cfg = make_config(copy)
    loader = build_train_loader(cfg, 0, 1)
    take(loader, 2)
    state = loader.state_dict()
    manifest = load_manifest(copy)
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64  # what a rebuild with other content records
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="'shards' was .* the shards' contents \\(manifest sha256\\) changed"):
        build_train_loader(cfg, 0, 1).load_state_dict(state)


@pytest.mark.parametrize("bufsize", [1, 4, 16, 500])
def test_the_shuffle_buffer_gives_webdatasets_own_order(tiny_shards, bufsize):
    """SetReader writes webdataset's shuffle stage out (a checkpoint must read and rebuild its buffer); same
    samples in, same RNG, the same order out as wds.shuffle."""
    import random

    import webdataset as wds

    from ppcr.data.stream import shard_samples, slot_shards

    ss = ShardSet.open(tiny_shards.parent, train_set(tiny_shards))
    for slot, num_slots in ((0, 1), (1, 3)):
        reader = SetReader(
            ss, set_index=0, seed=5, slot=slot, num_slots=num_slots, shuffle_buffer=bufsize, errors=_Errors(), epochs=1
        )
        ours = [r["__key__"] for r in reader]
        raw = (
            r
            for s in slot_shards(ss.shards, 5, 0, 0, slot, num_slots, True)
            for r in shard_samples(s["path"], _Errors())
        )
        theirs = [r["__key__"] for r in wds.shuffle(bufsize, initial=bufsize, rng=random.Random(f"5-0-0-{slot}"))(raw)]
        assert ours == theirs and len(ours) > 1
