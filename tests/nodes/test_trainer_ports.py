"""Trainer node ports mirror the trainer configs: ranges and choices come from the config's field metadata."""

from __future__ import annotations

from flowopd_core.distill.loss import DISTILL_MODES
from flowopd_nodes.engine.ports import all_ports
from flowopd_nodes.nodes.grpo import GRPOTrainerNode
from flowopd_nodes.nodes.opd import DistillerNode


def test_node_ports_take_their_ranges_and_choices_from_the_config():
    grpo = {p.name: p for p in all_ports(GRPOTrainerNode)}  # the node's own ports and its settings node's
    opd = {p.name: p for p in all_ports(DistillerNode)}
    assert (grpo["group_size"].min, grpo["group_size"].max) == (2, 1024)
    assert (opd["group_size"].min, opd["group_size"].max) == (1, 1024)
    assert (grpo["lr"].min, grpo["lr"].max) == (0.0, 1.0)  # lr > 0: the port shows the exclusive bound
    for ports in (grpo, opd):
        assert ports["kind"].type == "COMBO" and ports["kind"].choices == ("sde", "cps")
    assert opd["mode"].type == "COMBO" and opd["mode"].choices == DISTILL_MODES
    assert opd["kl_form"].choices == ("", "flow_grpo", "true", "mean")
    assert "advantage_clip" not in opd and opd["adv_clip"].default == 0.0 and grpo["adv_clip"].default == 5.0
