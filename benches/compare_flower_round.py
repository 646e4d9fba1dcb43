"""A whole Flower 1.42 round with SecAgg+ (and, as its baseline, without), timed the
way benches/secure_round.rs times ours: 10 simulated clients, d = 10^6 float32
parameters, a fixed update instead of training. The figure is the server workflow's
own time for one round (simulation start-up excluded). Run by benches/compare_flower.sh.
"""

import json
import sys
import time

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.simulation import run_simulation

D = 1_000_000
N = 10
SECURE = sys.argv[1] == "secagg" if len(sys.argv) > 1 else True
RESULT = {}


class FixedUpdate(NumPyClient):
    def fit(self, parameters, config):
        return [np.full(D, 0.01, dtype=np.float32)], 1, {}


def client_fn(context: Context):
    return FixedUpdate().to_client()


client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if SECURE else [])
server = ServerApp()


@server.main()
def main(grid, context: Context) -> None:
    ctx = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=1),
        strategy=FedAvg(
            fraction_evaluate=0.0,
            min_fit_clients=N,
            min_available_clients=N,
            initial_parameters=ndarrays_to_parameters([np.zeros(D, dtype=np.float32)]),
        ),
    )
    fit = SecAggPlusWorkflow(num_shares=N, reconstruction_threshold=N // 2 + 1) if SECURE else None
    workflow = DefaultWorkflow(fit_workflow=fit) if fit else DefaultWorkflow()
    start = time.perf_counter()
    workflow(grid, ctx)
    RESULT["round_s"] = time.perf_counter() - start


if __name__ == "__main__":
    run_simulation(server_app=server, client_app=client, num_supernodes=N, backend_config={"client_resources": {"num_cpus": 1}})
    json.dump({"secure": SECURE, **RESULT}, sys.stdout)
    print()
