"""The local runner: blocks and whole models timed in this process (ONNX Runtime or the LiteRT interpreter),
on this machine. Device runners (adb, ssh: `modules.latency.remote`) offer the same methods.
"""
from __future__ import annotations

import tempfile

import numpy as np

from modules.latency.keys import MEASURED_PLATFORMS, ORT_PLATFORMS, block_key
from modules.latency.models import (block_model_bytes, block_tflite, export_subnet, overhead_model_bytes,
                                    overhead_tflite, subnet_model_bytes, torch_block_bytes)
from modules.latency.sessions import device_info, ort_session, session_runner, tflite_runner
from modules.latency.timing import MeasureConfig, time_rounds


def block_runner(cfg: dict, platform: str, mc: MeasureConfig, workdir=None, exporter: str = "direct",
                 boundary: str = "network"):
    """A no-argument callable running the standalone model of one block once (it keeps its session)."""
    if platform in ORT_PLATFORMS:
        if exporter == "torch":
            data = torch_block_bytes(cfg, platform, mc.quant_format, workdir)
        else:
            data = block_model_bytes(cfg, platform, mc.quant_format, workdir, boundary)
        return session_runner(ort_session(data, mc.threads), iobinding=boundary == "network")
    if platform in MEASURED_PLATFORMS:
        tmp = tempfile.TemporaryDirectory(dir=workdir)
        fn = tflite_runner(block_tflite(cfg, platform, f"{tmp.name}/b.tflite"), mc.threads, mc.use_xnnpack)
        return lambda _keep=tmp: fn()  # the temp dir lives as long as the runner
    raise ValueError(f"platform {platform!r} is not measured; measured platforms: {', '.join(MEASURED_PLATFORMS)}")


def measure_block_stats(cfg: dict, platform: str, mc: MeasureConfig, workdir=None, exporter: str = "direct",
                        boundary: str = "network") -> dict:
    """Timing statistics (ms) of one block as a standalone model (:func:`block_runner`)."""
    return mc.time_many({0: block_runner(cfg, platform, mc, workdir, exporter, boundary)})[0]


def measure_block(cfg: dict, platform: str, threads: int = 1, warmup: int = 3, runs: int = 15,
                  workdir: str | None = None, exporter: str = "direct", quant_format: str = "qdq",
                  min_time: float = 0.04, clock: str = "cpu", stat: str = "min") -> float:
    """Latency (ms, `stat` of `clock` times) of one block as a standalone model on `platform`, session
    overhead included. ``exporter="torch"`` exports the torch block instead of writing the graph
    directly (ORT platforms; slower, for checks)."""
    mc = MeasureConfig(threads=threads, min_runs=runs, warmup=warmup, quant_format=quant_format,
                       min_time=min_time, clock=clock, stat=stat)
    return measure_block_stats(cfg, platform, mc, workdir, exporter)[stat]


def measure_overhead(platform: str, mc: MeasureConfig | None = None, repeats: int = 3) -> float:
    """Session-call overhead (ms): `mc.stat` run time of a trivial model, median over `repeats` sessions."""
    mc = mc or MeasureConfig()
    vals = []
    for _ in range(repeats):
        if platform in ORT_PLATFORMS:
            fn = session_runner(ort_session(overhead_model_bytes(), mc.threads), iobinding=True)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                fn = tflite_runner(overhead_tflite(platform, f"{tmp}/o.tflite"), mc.threads, mc.use_xnnpack)
        vals.append(mc.time(fn, platform, min_runs=200, min_time=0.02, warmup=20)[mc.stat])
    return float(np.median(vals))


def measure_model_file(path, platform: str, mc: MeasureConfig | None = None, min_runs: int = 20,
                       min_time: float = 0.3, warmup: int = 5, gap: float = 1.0) -> dict:
    """Timing statistics (ms) of a model file, sessions configured as `modules.benchmark`; the model is run
    as deployed (``session.run`` with a float input). The runs are split over ``mc.rounds`` rounds `gap` s
    apart: one round caught in a slow phase of a shared machine can measure a model far slower than a rerun
    a few minutes later."""
    mc = mc or MeasureConfig()
    if platform in ORT_PLATFORMS:
        fn = session_runner(ort_session(path, mc.threads))
    else:
        fn = tflite_runner(path, mc.threads, mc.use_xnnpack)
    st = mc.time_many({0: fn}, min_runs=min_runs, min_time=min_time, warmup=warmup, gap=gap)[0]
    st.pop("round_min", None)
    return st


def measure_subnet(net, platform: str, mc: MeasureConfig | None = None, workdir: str | None = None,
                   calib=None, **timing) -> dict:
    """End-to-end timing statistics (ms) of a whole network on `platform` (:func:`export_subnet` +
    :func:`measure_model_file`)."""
    mc = mc or MeasureConfig()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = export_subnet(net, platform, tmp, mc.quant_format, calib)
        return measure_model_file(path, platform, mc, **timing)


def measure_configs(block_configs: list[dict], platform: str, mc: MeasureConfig | None = None,
                    workdir: str | None = None, min_runs: int = 20, min_time: float = 0.3, warmup: int = 5) -> dict:
    """End-to-end timing statistics (ms) of a whole network given by its block configs, written directly
    (:func:`subnet_model_bytes`): node for node what the torch export + `modules.export.quantize_onnx_int8`
    give (the test suite checks it), built in a fraction of the time. ORT platforms only."""
    mc = mc or MeasureConfig()
    data = subnet_model_bytes(block_configs, platform, mc.quant_format, workdir)
    fn = session_runner(ort_session(data, mc.threads))
    return mc.time(fn, platform, min_runs=min_runs, min_time=min_time, warmup=warmup)


def measure_config_batch(models: dict, platform: str, mc: MeasureConfig | None = None, min_runs: int = 8,
                         min_time: float = 0.1, warmup: int = 2, seed: int = 0) -> dict:
    """End-to-end statistics of several whole networks ({key: block configs}) written directly
    (:func:`subnet_model_bytes`), built first and then timed together over ``mc.rounds`` shuffled rounds
    (`min_runs` / `min_time` per round), so each model's measurement spans several contention phases of a
    shared machine. Use batches of a few models (each session holds its weights)."""
    mc = mc or MeasureConfig()
    fns = {k: session_runner(ort_session(subnet_model_bytes(cfgs, platform, mc.quant_format), mc.threads))
           for k, cfgs in models.items()}
    return time_rounds(fns, mc.rounds, min_runs, mc.max_runs, min_time, warmup, mc.clock, seed,
                       max_rounds=mc.max_rounds, tol=mc.stable_tol, pin=mc.pin)


class LocalRunner:
    """Times blocks and whole models in this process. A batch of blocks is built, then timed together in
    shuffled rounds (:meth:`MeasureConfig.time_many`)."""

    kind = "local"
    batch_size = 32  # blocks built, then timed together

    def __init__(self, workdir: str | None = None):
        self.workdir = workdir
        self._described: dict | None = None

    def describe(self) -> dict:
        if self._described is None:
            self._described = dict(device_info(), runner=self.kind)
        return self._described

    def overhead(self, platform: str, mc: MeasureConfig) -> float:
        return measure_overhead(platform, mc)

    def time_blocks(self, cfgs: list[dict], platform: str, mc: MeasureConfig, seed: int = 0) -> dict[str, float]:
        """{block key: `mc.stat` of the standalone block's times (ms, session overhead included)}."""
        runners = {block_key(c): block_runner(c, platform, mc, self.workdir) for c in cfgs}
        return {k: st[mc.stat] for k, st in mc.time_many(runners, seed=seed).items()}

    def time_models(self, models: list[tuple[str, str]], platform: str, mc: MeasureConfig, exporter: str = "direct",
                    seed: int = 0) -> dict[tuple[str, str], dict]:
        """{(supernet, subnet): timing statistics (ms)} of whole subnets. ORT models written directly are
        timed together over shuffled rounds; others are exported through torch and timed one by one."""
        from modules.latency.sampling import subnet_block_configs

        if exporter == "direct" and platform in ORT_PLATFORMS:
            return measure_config_batch({m: subnet_block_configs(*m) for m in models}, platform, mc, seed=seed)
        import torch

        from modules.supernet import build_subnet

        torch.set_num_threads(1)
        return {m: measure_subnet(build_subnet(*m), platform, mc, self.workdir) for m in models}
