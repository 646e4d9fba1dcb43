"""Bring your own trainer to a medfl site agent.

A trainer is a program the site agent starts for each round, isolated: no network,
nothing of the host but the system's libraries, its own files, its working directory
and the one dataset the study was approved for. It speaks ``medfl.trainer.v1`` with the
agent over its standard input and output; this package does that part::

    import medfl_trainer as mt

    def train(task: mt.Task) -> mt.Update:
        x, y = mt.load_csv(task)               # the approved rows, the manifest's columns
        weights = task.model["layers.0.weight"]  # numpy arrays, by tensor name
        ...                                    # your training loop
        task.progress(0.5)                     # a heartbeat, whenever you like
        return mt.Update(params={"layers.0.weight": w, "layers.0.bias": b}, examples=len(y))

    mt.serve(train)

Print freely: ``serve`` moves ``sys.stdout`` to standard error (the site's log), so a
stray ``print`` cannot corrupt the protocol. Raise ``mt.TrainerError(kind, reason)`` to
refuse a round: the refusal names only your ``kind``; the reason stays in the site's log.

What happens to what you return: the agent (not this package) computes the delta,
refuses non-finite values or a wrong layout, clips it under site-level DP, noises or
masks it, charges its privacy ledger, logs it and sends it. Under DP no example count
and no metric leaves the site.
"""

from medfl_trainer.dpsgd import DpSgd
from medfl_trainer.protocol import LinearScale, Task, TrainerError, Update, load_csv, serve

__all__ = ["DpSgd", "LinearScale", "Task", "TrainerError", "Update", "load_csv", "serve"]
