"""Fault injection for the resume tests: kills a training process at a chosen point, as a preemption would.

A test adds ``"$faults.kill_at(@train#trainer, @validate#evaluator, '<point>', <count>)"`` (with
``"$import tests.faults as faults"`` among its ``imports``) to the config's
``initialize`` list; the process then sends itself SIGKILL (no handler, no clean-up, no atexit) at that point.
"""

import os
import signal

from ignite.engine import Events


def _die(*_) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at(trainer, evaluator, point: str, count: int) -> None:
    """Arms one kill.

    Args:
        trainer: the training engine.
        evaluator: the validation engine.
        point: ``iteration`` (after the ``count``-th training iteration), ``validation`` (after the ``count``-th
            validation image, counted over the whole run) or ``checkpoint_write`` (in the middle of writing the
            ``count``-th training checkpoint: half the bytes in the temporary file, not yet renamed).
        count: which occurrence of ``point`` kills.
    """
    if point == "iteration":
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=count), _die)
    elif point == "validation":
        seen = {"images": 0}

        def on_image(_):
            seen["images"] += 1
            if seen["images"] == count:
                _die()

        evaluator.add_event_handler(Events.ITERATION_COMPLETED, on_image)
    elif point == "checkpoint_write":
        import scripts.handlers.checkpoint as checkpoint

        real_save, writes = checkpoint.torch.save, {"n": 0}

        def cut_save(obj, handle, *args, **kwargs):
            real_save(obj, handle, *args, **kwargs)
            if isinstance(obj, dict) and "trainer" in obj:
                writes["n"] += 1
                if writes["n"] == count:
                    if isinstance(handle, (str, os.PathLike)):  # saved to the temporary path itself
                        os.truncate(handle, os.path.getsize(handle) // 2)
                    else:
                        handle.flush()
                        handle.truncate(handle.tell() // 2)
                        handle.flush()
                    _die()

        checkpoint.torch.save = cut_save
    else:
        raise ValueError(f"Unknown fault point '{point}'.")
