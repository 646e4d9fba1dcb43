"""A hospital's own trainer in plain numpy: logistic regression on the approved CSV.

The model is medfl's logistic-regression layout (``layers.0.weight`` [1, d],
``layers.0.bias`` [1]), so the federated model can be scored by ``medfl`` itself. With
the manifest's public scaling (``[data.scaling]``, which DP studies carry) the model
lives on those standardized coordinates, where DP noise is on the scale of the
weights; without one it lives on raw feature values and each site trains on its own
standardization, mapping the result back.

Under record-level DP (the site's policy lists this trainer in ``dp_sgd_trainers``) it trains
with ``medfl_trainer.DpSgd``: Poisson batches, per-example gradients clipped to C, OpenDP
noise, exactly the manifest's steps; the agent checks the noise it reports.

Run by the site agent (``[trainers.NAME] command = [python, "examples/logistic_numpy.py"]``).
"""

import numpy as np

import medfl_trainer as mt


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def train(task: mt.Task) -> mt.Update:
    names = [name for name, _ in task.layout]
    if names != ["layers.0.weight", "layers.0.bias"]:
        raise mt.TrainerError("layout", f"this trainer trains layers.0.weight and layers.0.bias, not {names}")
    x, y = mt.load_csv(task)
    if len(y) == 0:
        raise mt.TrainerError("data", f"{task.dataset_path} has no usable rows")
    scale = mt.LinearScale.of(task, x)
    xs = scale.standardize(x)
    w, b = scale.to_training(
        task.model["layers.0.weight"].astype(np.float64).reshape(-1), float(task.model["layers.0.bias"][0])
    )
    lr = task.learning_rate
    adam = task.optimizer == "adam"
    m_w, v_w, m_b, v_b, step = np.zeros_like(w), np.zeros_like(w), 0.0, 0.0, 0

    def gradient_steps():
        """(g_w, g_b) per optimizer step: DP-SGD's noisy means, or minibatch means."""
        if task.privacy.unit == "record":
            dpsgd = mt.DpSgd(task, n_rows=len(y), n_params=w.size + 1)
            for k, rows in enumerate(dpsgd.batches()):
                err = sigmoid(xs[rows] @ w + b) - y[rows]
                per_example = np.hstack([xs[rows] * err[:, None], err[:, None]])
                g = dpsgd.noisy_mean(per_example)
                yield g[:-1], float(g[-1])
                task.progress((k + 1) / dpsgd.steps)
            noise[0] = dpsgd.effective_noise_multiplier
            return
        rng = np.random.default_rng(task.seed)
        batch = max(1, task.batch_size)
        for epoch in range(task.local_epochs):
            order = rng.permutation(len(y))
            for at in range(0, len(y), batch):
                rows = order[at : at + batch]
                err = sigmoid(xs[rows] @ w + b) - y[rows]
                yield xs[rows].T @ err / len(rows), float(err.mean())
            task.progress((epoch + 1) / max(1, task.local_epochs))

    noise = [0.0]
    for g_w, g_b in gradient_steps():
        step += 1
        if adam:
            m_w = 0.9 * m_w + 0.1 * g_w
            v_w = 0.999 * v_w + 0.001 * g_w**2
            m_b = 0.9 * m_b + 0.1 * g_b
            v_b = 0.999 * v_b + 0.001 * g_b**2
            c1, c2 = 1 - 0.9**step, 1 - 0.999**step
            w -= lr * (m_w / c1) / (np.sqrt(v_w / c2) + 1e-8)
            b -= lr * (m_b / c1) / (np.sqrt(v_b / c2) + 1e-8)
        else:
            w -= lr * g_w
            b -= lr * g_b
    p = np.clip(sigmoid(xs @ w + b), 1e-7, 1 - 1e-7)
    loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    print(f"round {task.round}: {len(y)} rows, loss {loss:.4f}")
    w, b = scale.to_federated(w, b)
    return mt.Update(
        params={
            "layers.0.weight": w.reshape(1, -1).astype(np.float32),
            "layers.0.bias": np.array([b], dtype=np.float32),
        },
        examples=len(y),
        metrics={"loss": loss},
        noise_multiplier=noise[0],
    )


if __name__ == "__main__":
    mt.serve(train)
