"""launch/train.py with one fault injected, for the fault tests; run in its place by the deepspeed
launcher. PPCR_FAULT (JSON) says which:

    {"stop_after_step": S, "rank": R}   rank R stops itself (SIGSTOP) after step S, for the test to kill -9
    {"die_in_save": TAG, "rank": R}     rank R is killed (SIGKILL) halfway through writing its optimizer
                                        states of checkpoint TAG
    {"nan": TERM, "calls": [...], "rank": R}   on rank R, loss term TERM (l1 or giou) is NaN in the
                                        listed forward calls (1-based; grad_accum calls per step)
    {"sigterm_in_validation": N, "rank": R, "out": PATH}   rank R sends itself SIGTERM while it predicts
                                        its N-th validation batch, and writes to PATH how many batches it
                                        predicted after that one
"""

import io
import json
import os
import signal
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "launch"))

FAULT = json.loads(os.environ["PPCR_FAULT"])
MINE = int(os.environ.get("RANK", "0")) == FAULT["rank"]


def stop_after_step() -> None:
    from ppcr.profiling import StepProfiler

    end = StepProfiler.end

    def patched(self, step):
        end(self, step)
        if step == FAULT["stop_after_step"]:
            os.kill(os.getpid(), signal.SIGSTOP)

    StepProfiler.end = patched


def die_in_save() -> None:
    save = torch.save

    def patched(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)) and FAULT["die_in_save"] in str(f) and str(f).endswith("optim_states.pt"):
            buf = io.BytesIO()
            save(obj, buf, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                out.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, f, *args, **kwargs)

    torch.save = patched


def nan_loss() -> None:
    import ppcr.model.model as model

    box_losses, calls = model.box_losses, [0]

    def patched(pred, target):
        l1, giou = box_losses(pred, target)
        calls[0] += 1
        if calls[0] in FAULT["calls"]:
            poison = torch.tensor(float("nan"))
            l1, giou = (l1 * poison, giou) if FAULT["nan"] == "l1" else (l1, giou * poison)
        return l1, giou

    model.box_losses = patched


def sigterm_in_validation() -> None:
    import atexit

    import ppcr.eval.evaluate as evaluate

    predict_items, calls = evaluate.predict_items, [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == FAULT["sigterm_in_validation"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return predict_items(*args, **kwargs)

    evaluate.predict_items = patched
    atexit.register(lambda: Path(FAULT["out"]).write_text(str(calls[0] - FAULT["sigterm_in_validation"])))


KINDS = {
    "stop_after_step": stop_after_step,
    "die_in_save": die_in_save,
    "nan": nan_loss,
    "sigterm_in_validation": sigterm_in_validation,
}
if MINE:
    KINDS[next(k for k in KINDS if k in FAULT)]()

from train import main  # noqa: E402  (launch/train.py, after the patches)

sys.exit(main())
