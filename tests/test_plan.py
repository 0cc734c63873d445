"""The scale model's closed forms against hand-computed cases, its monotonicity, and ``locallearn plan``."""

from __future__ import annotations

import itertools
import random
import time

import pytest

from locallearn import plan
from locallearn.cli import main
from locallearn.engines.pipeline import assign_stages
from locallearn.errors import ConfigError

FREE = plan.Link(0.0, 1e30)  # a link that costs nothing


def test_bubble_fraction_is_k_minus_1_over_m_plus_k_minus_1():
    assert plan.bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert plan.bubble_fraction(2, 1) == pytest.approx(0.5)
    assert plan.bubble_fraction(1, 8) == 0.0


def test_ring_allreduce_pays_2_d_minus_1_latencies_and_2_d_minus_1_over_d_of_the_bytes():
    link = plan.Link(1e-5, 1e9)
    assert plan.ring_allreduce_seconds(1e6, 4, link) == pytest.approx(6 * 1e-5 + 1.5e-3)
    assert plan.ring_allreduce_seconds(1e6, 1, link) == 0.0


def test_local_pipeline_rate_is_the_slowest_node_plus_its_send():
    stages = [plan.StageCost(s, out_bytes=100) for s in (1e-3, 3e-3, 2e-3)]
    assert plan.local_pipeline(stages, 10, FREE).images_per_s == pytest.approx(10 / 0.03)
    link = plan.Link(1e-3, 1e6)  # 1000 bytes per send: 2 ms
    assert plan.local_pipeline(stages, 10, link).step_seconds == pytest.approx(0.032)
    # two workers: stages 2 and 3 on the second node (the rule of assign_stages)
    assert plan.local_pipeline(stages, 10, FREE, workers=2).step_seconds == pytest.approx(0.05)


def test_local_pipeline_adds_one_traversal_of_the_other_nodes_per_epoch():
    stages = [plan.StageCost(s) for s in (1e-3, 3e-3, 2e-3)]
    p = plan.local_pipeline(stages, 10, FREE, steps_per_epoch=4)
    assert p.step_seconds == pytest.approx(0.03 + (0.01 + 0.02) / 4)


def test_an_overlapped_link_bound_epoch_still_pays_the_first_compute_and_the_last():
    """Sends beside compute: the steady step is the send (the link is the slowest), but the
    first micro-batch is computed before anything is sent and the last one after."""
    stages = [plan.StageCost(1e-3, out_bytes=100), plan.StageCost(2e-3)]
    link = plan.Link(0.0, 1e4)  # 1000 bytes per send: 0.1 s
    p = plan.local_pipeline(stages, 10, link, steps_per_epoch=4, overlap_send=True)
    assert p.step_seconds == pytest.approx(0.1 + (0.01 + 0.1 + 0.02 - 0.1) / 4)


def test_local_pipeline_replicas_share_the_batch_and_all_reduce_their_stage():
    stages = [plan.StageCost(1e-3, param_bytes=1e6), plan.StageCost(1e-3, param_bytes=1e6)]
    link = plan.Link(0.0, 1e9)
    p = plan.local_pipeline(stages, 8, link, replicas=2)
    assert p.step_seconds == pytest.approx(4e-3 + 1e-3) and p.devices == 4


def test_shared_cores_bound_the_step_by_total_work():
    stages = [plan.StageCost(1e-3) for _ in range(4)]
    assert plan.local_pipeline(stages, 10, FREE, cores=2).step_seconds == pytest.approx(0.02)


def test_gpipe_step_is_m_plus_k_minus_1_slots_and_holds_all_micro_batches():
    stages = [plan.StageCost(1e-3, saved_bytes=10), plan.StageCost(1e-3, saved_bytes=10)]
    g = plan.bp_pipeline(stages, 8, FREE, 4, "gpipe")
    assert g.step_seconds == pytest.approx(5 * 2e-3) and g.images_per_s == pytest.approx(800)
    assert g.memory_bytes == pytest.approx(4 * 2 * 10)
    one = plan.bp_pipeline(stages, 8, FREE, 4, "1f1b")
    assert one.step_seconds == g.step_seconds and one.memory_bytes == pytest.approx(2 * 2 * 10)


def test_ddp_is_compute_on_a_shard_plus_the_all_reduce():
    stages = [plan.StageCost(1e-3, param_bytes=5e5), plan.StageCost(1e-3, param_bytes=5e5)]
    link = plan.Link(0.0, 1e9)
    assert plan.ddp(stages, 8, link, 2, overlap=False).step_seconds == pytest.approx(9e-3)
    assert plan.ddp(stages, 8, link, 2, overlap=True).step_seconds == pytest.approx(8e-3)


def test_contiguous_placement_is_the_pipelines_own():
    for k in range(1, 7):
        for w in range(1, k + 1):
            assert plan.contiguous(k, w) == assign_stages(k, w)


def _random_stages(rng: random.Random, k: int) -> list[plan.StageCost]:
    return [plan.StageCost(rng.uniform(1e-5, 1e-3), head_seconds=rng.uniform(0, 1e-4),
                           out_bytes=rng.uniform(1e3, 1e6), param_bytes=rng.uniform(1e5, 1e8),
                           saved_bytes=rng.uniform(1e3, 1e6), fixed_seconds=1e-5)
            for _ in range(k)]


def test_a_faster_link_is_never_slower():
    rng = random.Random(0)
    slow, fast = plan.Link(1e-4, 1e9), plan.Link(1e-6, 1e11)
    for k, m, d in itertools.product((2, 3, 5), (1, 4), (1, 3)):
        stages = _random_stages(rng, k)
        pairs = [(plan.local_pipeline(stages, 96, link, None, m, d) for link in (slow, fast)),
                 (plan.bp_pipeline(stages, 96, link, m, "1f1b", d) for link in (slow, fast)),
                 (plan.ddp(stages, 96, link, d * k) for link in (slow, fast))]
        for a, b in pairs:
            assert b.images_per_s >= a.images_per_s
    blocks = _random_stages(rng, 8)
    cut = plan.balanced(blocks)
    a, b = (plan.recommend(blocks, blocks, 16, 256, link, cut_fn=cut) for link in (slow, fast))
    assert b.best.images_per_s >= a.best.images_per_s


def test_parse_link_names_the_choices():
    assert plan.parse_link("5,25") == plan.Link(5e-6, 25e9)
    assert plan.parse_link("nvlink") == plan.LINKS["nvlink"]
    with pytest.raises(ConfigError, match="nvlink, ethernet"):
        plan.parse_link("fast")


def test_plan_prints_a_recommendation_for_a_tiny_config(capsys):
    start = time.perf_counter()
    assert main(["plan", "model=mlp", "model.options={hidden: [16, 16, 16]}", "data=synthetic",
                 "data.options={n_train: 64, n_test: 16, shape: [1, 8, 8]}",
                 "--devices", "4", "--link", "ethernet"]) == 0
    out = capsys.readouterr().out
    assert time.perf_counter() - start < 20  # ~1-4 s here (2 shared cores); a bound, not a benchmark
    assert "recommended: local pipeline" in out and "cuts [" in out and "images/s" in out
    assert "MiB per device" in out and "ddp" in out


def test_plan_with_a_bad_link_is_a_one_line_error(capsys):
    assert main(["plan", "model=mlp", "data=synthetic", "--devices", "4", "--link", "x"]) == 2
    assert "--link 'x' is not allowed" in capsys.readouterr().err


def test_plan_needs_only_the_input_shape_not_the_data_set(capsys):
    assert main(["plan", "model=mlp", "model.options={hidden: [8, 8]}", "data=cifar10",
                 "data.data_dir=/nonexistent", "--input-shape", "1,4,4", "--classes", "3",
                 "--devices", "2"]) == 0
    assert "recommended: local pipeline" in capsys.readouterr().out
