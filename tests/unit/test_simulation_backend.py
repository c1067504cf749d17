"""fed_netgpt/cli.simulation_backend: the Ray settings `fed-netgpt simulate` hands Flower."""

from __future__ import annotations

import os

from fed_netgpt.cli import simulation_backend
from fed_netgpt.config import SimulationConfig


def test_a_ray_of_this_machine_by_default_with_each_clients_share():
    backend = simulation_backend(SimulationConfig(num_cpus_per_client=1.0, num_gpus_per_client=0.25))
    assert backend == {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.25},
                       "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}}


def test_a_ray_address_joins_that_cluster_and_leaves_its_size_to_it():
    # Ray refuses num_cpus when it connects to a running cluster: only the address goes
    backend = simulation_backend(SimulationConfig(ray_address="10.0.0.5:6379"))
    assert backend["init_args"] == {"address": "10.0.0.5:6379"}
    assert backend["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.0}
