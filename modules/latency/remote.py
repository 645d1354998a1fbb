"""Device runners: the block and whole-subnet models are written here, pushed to the device the user deploys
to, timed there, and the times come back to fill the same table as the local runner.

* :class:`AdbRunner`: an Android phone over ``adb``, LiteRT's ``benchmark_model`` binary on the phone
  (``tflite_*`` platforms; the original's settings: 1 thread, pinned with ``taskset`` if asked, XNNPACK
  as chosen). Its output line ``Inference timings in us: ... Inference (avg): N`` gives the mean of the
  timed runs of one invocation; a model is invoked over several rounds and the smallest mean kept.
* :class:`SshRunner`: a host over ``ssh``, models timed by ``modules.latency.remote_timer`` run there with
  python (ONNX Runtime, or LiteRT for ``tflite_*``; the same timing code as the local runner). Files go over
  the ssh connection itself (``cat > file``), so only ``ssh`` is needed.

The adb runner times one block per device call, the ssh runner a batch of up to 8 (timed together in
shuffled rounds, as locally); the predictor saves the table after each call's blocks, so a device that
disconnects mid-table loses at most the blocks it was timing, and a rerun continues from there. Times come
back on the device command's standard output (nothing is left to pull).
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from modules.latency.keys import MEASURED_PLATFORMS, ORT_PLATFORMS, TFLITE_PLATFORMS, block_key
from modules.latency.models import write_block_model, write_overhead_model, write_subnet_model
from modules.latency.timing import MeasureConfig

RUNNERS = ("local", "adb", "ssh")
_CALL_TIMEOUT = 600  # s per device call: a hung device is an error, not a hung table build
_AVG_US = re.compile(r"Inference timings in us:.*?Inference \(avg\):\s*([0-9.eE+-]+)")


class DeviceError(ValueError):
    """The device failed or answered nonsense (one line naming the device call and the model)."""


class _DeviceRunner(ABC):
    """What both device runners share: writing the model files, pushing them, device calls, errors."""

    kind = "device"
    batch_size = 1  # one block per device call, the table saved after each
    platforms = MEASURED_PLATFORMS

    def __init__(self, workdir: str | None = None):
        self.workdir = workdir
        self._described: dict | None = None
        self._ready = False

    # ------------------------------------------------------------------ subclass interface
    @abstractmethod
    def _describe(self) -> dict:
        """What the device is (name, CPU, runtime), stored with the table."""

    def _setup(self) -> None:
        """Prepare the device once (directories, helper files)."""

    @abstractmethod
    def _push(self, path: Path) -> str:
        """Copy a model file to the device; its path there."""

    @abstractmethod
    def _time(self, remote: str, what: str, platform: str, mc: MeasureConfig, kind: str) -> dict:
        """Statistics of one pushed file timed on the device."""

    def _time_many(self, remotes: dict[str, str], whats: dict[str, str], platform: str, mc: MeasureConfig,
                   kind: str) -> dict[str, dict]:
        """{key: statistics} of several pushed files (default: one device call each)."""
        return {k: self._time(r, whats[k], platform, mc, kind) for k, r in remotes.items()}

    # ------------------------------------------------------------------ shared
    def _call(self, cmd: list[str], what: str, stdin: bytes | None = None) -> str:
        """Run one device command; a missing tool, a failure or a timeout is a DeviceError naming `what`."""
        try:
            r = subprocess.run(cmd, input=stdin, capture_output=True, timeout=_CALL_TIMEOUT)
        except FileNotFoundError:
            raise DeviceError(f"{self.kind} runner: {cmd[0]!r} not found (put it on PATH or pass its path)") from None
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{self.kind} runner: no answer within {_CALL_TIMEOUT} s while {what}") from None
        out = r.stdout.decode(errors="replace")
        if r.returncode != 0:
            err = (r.stderr.decode(errors="replace").strip() or out.strip()).splitlines()
            raise DeviceError(f"{self.kind} runner: {' '.join(cmd[:1] + cmd[1:3])} failed (exit {r.returncode}) while "
                              f"{what}: {err[-1] if err else 'no message'}; measured entries are saved, rerun to "
                              "continue")
        return out

    def _check_platform(self, platform: str) -> None:
        if platform not in self.platforms:
            raise ValueError(f"the {self.kind} runner times {', '.join(self.platforms)} models, not {platform!r}")

    def _ensure_ready(self) -> None:
        if not self._ready:
            self._setup()
            self._ready = True

    def describe(self) -> dict:
        if self._described is None:
            self._described = dict(self._describe(), runner=self.kind)
        return self._described

    def _time_file(self, path: Path, what: str, platform: str, mc: MeasureConfig, kind: str) -> dict:
        self._ensure_ready()
        return self._time(self._push(path), what, platform, mc, kind)

    def overhead(self, platform: str, mc: MeasureConfig) -> float:
        self._check_platform(platform)
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            path = write_overhead_model(platform, tmp)
            return self._time_file(path, "timing the overhead model", platform, mc, "block")[mc.stat]

    def time_blocks(self, cfgs: list[dict], platform: str, mc: MeasureConfig, seed: int = 0) -> dict[str, float]:
        """{block key: `mc.stat` of the block's standalone model timed on the device (ms)}."""
        self._check_platform(platform)
        self._ensure_ready()
        remotes, whats = {}, {}
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            for c in cfgs:
                key = block_key(c)
                path = write_block_model(c, platform, tmp, f"b_{key}", mc.quant_format)
                remotes[key], whats[key] = self._push(path), f"timing block {key}"
                path.unlink()
        return {k: st[mc.stat] for k, st in self._time_many(remotes, whats, platform, mc, "block").items()}

    def time_models(self, models: list[tuple[str, str]], platform: str, mc: MeasureConfig, exporter: str = "direct",
                    seed: int = 0) -> dict[tuple[str, str], dict]:
        """{(supernet, subnet): timing statistics (ms)} of whole subnets timed on the device."""
        self._check_platform(platform)
        self._ensure_ready()
        remotes, whats = {}, {}
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            for i, m in enumerate(models):
                path = write_subnet_model(m, platform, tmp, f"m{seed}_{i}", mc.quant_format, exporter)
                remotes[m], whats[m] = self._push(path), f"timing subnet {m[0]} {m[1]}"
                path.unlink()
        return self._time_many(remotes, whats, platform, mc, "model")


def parse_benchmark_model(text: str, what: str) -> float:
    """The mean inference time (ms) in LiteRT ``benchmark_model`` output; DeviceError naming `what` if the
    output has no such line."""
    m = _AVG_US.search(" ".join(text.split()))
    try:
        us = float(m.group(1)) if m else float("nan")
    except ValueError:
        us = float("nan")
    if not us >= 0 or us == float("inf"):
        tail = " ".join(text.split())[-160:] or "nothing"
        raise DeviceError(f"benchmark_model gave no 'Inference (avg)' time while {what}; it printed: {tail!r}")
    return us / 1e3


class AdbRunner(_DeviceRunner):
    """An Android device over adb, models timed by LiteRT's ``benchmark_model`` (``tflite_*`` platforms)."""

    kind = "adb"
    platforms = TFLITE_PLATFORMS

    def __init__(self, serial: str | None = None, adb: str = "adb",
                 benchmark_model: str = "/data/local/tmp/benchmark_model", remote_dir: str = "/data/local/tmp/spaceevo",
                 taskset: str | None = None, workdir: str | None = None):
        super().__init__(workdir)
        self.serial, self.adb, self.benchmark_model = serial, adb, benchmark_model
        self.remote_dir, self.taskset = remote_dir.rstrip("/"), taskset

    def _adb(self, *args: str) -> list[str]:
        return [self.adb] + (["-s", self.serial] if self.serial else []) + list(args)

    def _describe(self) -> dict:
        serial = self._call(self._adb("get-serialno"), "asking the device for its serial number").strip()
        model = self._call(self._adb("shell", "getprop", "ro.product.model"), "asking the device for its model")
        abi = self._call(self._adb("shell", "getprop", "ro.product.cpu.abi"), "asking the device for its ABI")
        return {"target": serial, "model": model.strip(), "abi": abi.strip(), "benchmark_model": self.benchmark_model}

    def _setup(self) -> None:
        self._call(self._adb("shell", "mkdir", "-p", self.remote_dir), f"creating {self.remote_dir} on the device")

    def _push(self, path: Path) -> str:
        remote = f"{self.remote_dir}/{path.name}"
        self._call(self._adb("push", str(path), remote), f"pushing {path.name}")
        return remote

    def _time(self, remote: str, what: str, platform: str, mc: MeasureConfig, kind: str) -> dict:
        """Rounds of one ``benchmark_model`` invocation each, until the smallest mean stops falling; the
        table's statistic is that smallest mean."""
        if mc.stat != "mean" or mc.clock != "wall":
            raise ValueError(f"benchmark_model reports the mean wall-clock time: the adb runner needs stat 'mean' "
                             f"and clock 'wall', not {mc.stat!r} / {mc.clock!r}")
        pin = ["taskset", self.taskset] if self.taskset else []
        cmd = self._adb("shell", *pin, self.benchmark_model, f"--graph={remote}", f"--num_threads={mc.threads}",
                        f"--use_xnnpack={'true' if mc.use_xnnpack else 'false'}", f"--warmup_runs={max(mc.warmup, 1)}",
                        f"--num_runs={max(mc.min_runs, 1)}")
        means: list[float] = []
        for i in range(max(mc.rounds, mc.max_rounds, 1)):
            means.append(parse_benchmark_model(self._call(cmd, what), what))
            if i + 1 >= max(mc.rounds, 1) and means[-1] >= (1.0 - mc.stable_tol) * min(means[:-1] or means):
                break
        return {"mean": min(means), "runs": len(means) * max(mc.min_runs, 1), "round_mean": means}


class SshRunner(_DeviceRunner):
    """A host over ssh, models timed there by ``python -m modules.latency.remote_timer``. Blocks go in batches
    of `batch_size`, timed together in shuffled rounds as the local runner does (the table is saved after
    each batch)."""

    kind = "ssh"
    batch_size = 8
    _CODE = ("__init__.py", "sessions.py", "timing.py", "remote_timer.py")  # what the remote timer imports

    def __init__(self, host: str, ssh: str = "ssh", python: str = "python3", remote_dir: str = "/tmp/spaceevo_latency",
                 ssh_options: tuple[str, ...] = ("-o", "BatchMode=yes"), workdir: str | None = None):
        super().__init__(workdir)
        if not host:
            raise ValueError("the ssh runner needs a host (--ssh_host user@machine)")
        self.host, self.ssh, self.python = host, ssh, python
        self.remote_dir, self.ssh_options = remote_dir.rstrip("/"), tuple(ssh_options)

    def _remote(self, command: str, what: str, stdin: bytes | None = None) -> str:
        return self._call([self.ssh, *self.ssh_options, self.host, command], what, stdin)

    def _upload(self, data: bytes, remote: str, what: str) -> None:
        d = shlex.quote(remote.rsplit("/", 1)[0])
        self._remote(f"mkdir -p {d} && cat > {shlex.quote(remote)}", what, data)

    def _setup(self) -> None:
        here = Path(__file__).resolve().parent
        self._upload(b"", f"{self.remote_dir}/code/modules/__init__.py", "copying the timer to the host")
        for name in self._CODE:
            self._upload((here / name).read_bytes(), f"{self.remote_dir}/code/modules/latency/{name}",
                         "copying the timer to the host")

    def _timer(self, args: list[str], what: str) -> list[dict]:
        self._ensure_ready()
        cmd = (f"cd {shlex.quote(self.remote_dir + '/code')} && {self.python} -m modules.latency.remote_timer "
               + " ".join(shlex.quote(a) for a in args))
        out = self._remote(cmd, what)
        try:
            rows = [json.loads(line) for line in out.splitlines() if line.strip()]
            if not rows or not isinstance(rows[0], dict) or "device" not in rows[0]:
                raise ValueError
        except ValueError:
            tail = " ".join(out.split())[-160:] or "nothing"
            raise DeviceError(f"ssh runner: the host's timer gave no result while {what}; it printed: "
                              f"{tail!r}") from None
        return rows

    def _describe(self) -> dict:
        return dict(self._timer(["--info"], "asking the host for its description")[0]["device"], target=self.host)

    def _push(self, path: Path) -> str:
        remote = f"{self.remote_dir}/models/{path.name}"
        self._upload(path.read_bytes(), remote, f"copying {path.name} to the host")
        return remote

    def _time(self, remote: str, what: str, platform: str, mc: MeasureConfig, kind: str) -> dict:
        return self._time_many({0: remote}, {0: what}, platform, mc, kind)[0]

    def _time_many(self, remotes: dict, whats: dict, platform: str, mc: MeasureConfig, kind: str) -> dict:
        """One timer call for all files: `mc`'s rounds; whole models with the local runner's whole-model
        settings. A file without a valid time is a DeviceError naming its block or model."""
        block = kind == "block"
        runs, min_time, warmup = (mc.min_runs, mc.min_time, mc.warmup) if block else \
            (8 * mc.rounds, 0.1 * mc.rounds, 2)
        args = ["--threads", str(mc.threads), "--clock", mc.clock, "--rounds", str(mc.rounds), "--max_rounds",
                str(mc.max_rounds), "--min_runs", str(runs), "--min_time", str(min_time), "--warmup", str(warmup)]
        args += (["--iobinding"] if block and platform in ORT_PLATFORMS else []) + \
            ([] if mc.use_xnnpack else ["--no_xnnpack"]) + ([] if mc.pin else ["--no_pin"]) + list(remotes.values())
        first = next(iter(whats.values()))
        what = "; ".join(whats.values()) if len(whats) < 4 else f"{first} and {len(whats) - 1} more"
        rows = {r.get("file"): r for r in self._timer(args, what)[1:] if isinstance(r, dict)}
        out = {}
        for k, remote in remotes.items():
            st = rows.get(remote.rsplit("/", 1)[1])
            try:
                value = float(st[mc.stat])
                if not value >= 0 or value == float("inf"):
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise DeviceError(f"ssh runner: no valid {mc.stat} time while {whats[k]}; the host said {st!r}") \
                    from None
            out[k] = st
        return out


def make_runner(kind: str = "local", workdir: str | None = None, **opts):
    """The runner `kind` (local, adb, ssh) with its options (None values: the runner's defaults)."""
    from modules.latency.local import LocalRunner

    opts = {k: v for k, v in opts.items() if v is not None}
    if kind == "local":
        return LocalRunner(workdir)
    if kind == "adb":
        return AdbRunner(workdir=workdir, **opts)
    if kind == "ssh":
        return SshRunner(workdir=workdir, **opts)
    raise ValueError(f"device runner {kind!r}; allowed: {', '.join(RUNNERS)}")
