"""The training engine (DESIGN.md §5): one loop on Hugging Face accelerate that runs any method.

Entry points:
- :func:`distill` (also ``fewstep.distill``) — train a method on a teacher into a run directory;
- :func:`load_run` — load a finished or partial run back as its method (evaluation-EMA student);
- ``fewstep distill`` on the command line (:mod:`fewstep.commands.distill`).

What a method can rely on (the contract of :mod:`fewstep.methods.base`, as the engine runs it):

- **Iterations.** Iteration ``i`` (0, 1, ...; ``max_steps`` counts them) calls
  ``method.losses(batch, i, due)`` with ``due = {k : optimizers()[k].due(i)}`` (``every``/``offset``
  ratios) and must return exactly those losses. Nothing is called when nothing is due.
- **Batches.** ``batch.size`` is the per-process micro-batch (``--batch`` / processes /
  ``grad_accum``); ``batch.x`` holds real data when ``method.needs_data`` (read on the instance,
  so a config may switch it) else ``None``; ``batch.labels`` are uniform class labels (data labels
  with data) or ``None`` for an unconditional teacher; noise is drawn on the student's device.
- **Backward.** Each returned loss is back-propagated into the parameters of its own optimizer only
  (``backward(inputs=...)``, graph retained between losses), so gradients never leak between
  optimizers and losses may share a graph. All backward passes of an iteration happen before any
  optimizer steps. With ``grad_accum > 1`` ``losses`` is called once per micro-batch and the
  gradients are averaged. Then: gradients averaged over processes, clipped to ``grad_clip``,
  ``lr * lr_schedule(k)`` applied, the optimizer stepped. Under FSDP2 (``accelerate launch`` with
  an FSDP config, docs/engine.md) the trainable networks are sharded in place (``fully_shard``;
  their parameters become ``DTensor``s), each loss is back-propagated into all of them and only its
  own optimizer's gradients are kept — the same gradients; frozen networks are sharded too (one unit
  per submodule with parameters; input gradients still flow through them); EMA copies stay whole.
- **Frozen networks** (``frozen()``, the teacher by default) are put in eval mode with
  ``requires_grad=False`` and never get gradients or optimizer state.
- **EMA copies** (``emas()``): attributes of the method, frozen, updated after every step of the
  optimizer that owns their source, with ``decay`` evaluated at the iteration. A separate
  *evaluation EMA* of ``student`` (``--set ema_decay=...``, default 0.999) is what sample grids,
  evaluation, ``load_run`` and ``fewstep sample`` use; a method never sees it.
- **Randomness** comes from torch's global RNG, seeded per process from ``--seed``; the data
  sampler has its own generator shared by all processes. Both (and NumPy/Python RNGs) are saved
  in checkpoints, so ``--resume`` continues bit-exactly on the CPU. Sampling and evaluation run
  under a forked RNG and never change the training trajectory.
- **State** outside networks and EMAs must be returned by ``extra_state()`` (JSON) to survive a
  resume; nothing else of a method is saved.
- **Non-finite losses.** If any loss of an iteration is NaN/inf, the whole iteration's optimizer
  steps and EMA updates are skipped (on the device, for fused Adam/AdamW) and counted;
  ``max_nonfinite`` in a row stop the run with a clear error, the last checkpoint intact.
- **Mixed precision** (``--set mixed_precision=bf16``) runs ``losses`` under accelerate's
  autocast; weights, optimizer state and EMAs stay float32.
- **Hot path.** The engine makes no host synchronisation between logging points (``log_every``)
  except for a non-fused optimizer (RAdam), which needs one to skip a non-finite step.

Evaluation hook: ``eval_hook(method, step, run_dir) -> dict | None`` runs on the main process every
``eval_every`` iterations and at the end, with the evaluation EMA in the student's place, in eval
mode, under ``torch.no_grad`` and a forked RNG; a returned dict is logged as ``eval/<key>``. The
CLI (:mod:`fewstep.commands.distill`) passes ``fewstep.eval.training_hook`` when it exists.
"""

from __future__ import annotations

from fewstep.runs import load_run
from fewstep.train.api import distill
from fewstep.train.config import TrainConfig
from fewstep.train.loop import TrainingInterrupted, train

__all__ = ["TrainConfig", "TrainingInterrupted", "distill", "load_run", "train"]
