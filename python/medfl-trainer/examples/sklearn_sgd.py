"""A hospital's own trainer with scikit-learn: ``SGDClassifier`` (logistic loss) started
from the global model, on the approved CSV.

The layout is medfl's logistic regression (``layers.0.weight`` [1, d], ``layers.0.bias``
[1]); like ``logistic_numpy.py`` the model lives on the manifest's public scale when it
has one, else on raw values (each site standardizing with its own statistics).
SGDClassifier cannot clip per example, so this trainer is for studies without
record-level DP.
"""

import numpy as np
from sklearn.linear_model import SGDClassifier

import medfl_trainer as mt


def train(task: mt.Task) -> mt.Update:
    names = [name for name, _ in task.layout]
    if names != ["layers.0.weight", "layers.0.bias"]:
        raise mt.TrainerError("layout", f"this trainer trains layers.0.weight and layers.0.bias, not {names}")
    if task.privacy.unit == "record":
        raise mt.TrainerError("record_dp", "SGDClassifier cannot clip per example")
    x, y = mt.load_csv(task)
    if len(np.unique(y)) < 2:
        raise mt.TrainerError("data", "SGDClassifier needs both labels among the rows")
    scale = mt.LinearScale.of(task, x)
    xs = scale.standardize(x)
    w, b = scale.to_training(
        task.model["layers.0.weight"].astype(np.float64).reshape(-1), float(task.model["layers.0.bias"][0])
    )
    clf = SGDClassifier(
        loss="log_loss",
        learning_rate="constant",
        eta0=task.learning_rate,
        alpha=1e-4,
        max_iter=max(1, task.local_epochs),
        tol=None,
        random_state=task.seed % (2**32),
    )
    clf.fit(xs, y.astype(int), coef_init=w.reshape(1, -1), intercept_init=np.array([b]))
    w, b = scale.to_federated(clf.coef_.reshape(-1), float(clf.intercept_[0]))
    return mt.Update(
        params={
            "layers.0.weight": w.reshape(1, -1).astype(np.float32),
            "layers.0.bias": np.array([b], dtype=np.float32),
        },
        examples=len(y),
    )


if __name__ == "__main__":
    mt.serve(train)
