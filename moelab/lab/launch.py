"""`moelab launch vllm|sglang|moelab MODEL --strategy ...`: start a server with a placement strategy, wait for
/health, check that /v1/models serves the model asked for, record the exact command and version, optionally run
`moelab bench serve` against it, stop it. Several --strategy values are a sweep; --dry-run prints the commands.

A strategy is tp (tensor parallel size), dp (data parallel size: attention replicated, GPUs = tp x dp), ep (experts
placed whole on ranks, EP size = tp x dp) and eplb (expert-parallel load balancing, needs ep). Each engine's
spelling (checked against their docs):
  vLLM    `vllm serve M --tensor-parallel-size tp --data-parallel-size dp [--enable-expert-parallel]
          [--enable-eplb --eplb-config '{"num_redundant_experts", "window_size", "step_interval"}']`
  SGLang  `python3 -m sglang.launch_server --model-path M --tp-size tp*dp [--dp-size dp --enable-dp-attention]
          [--ep-size tp*dp] [--enable-eplb --ep-num-redundant-experts R --eplb-rebalance-num-iterations S
          --expert-distribution-recorder-buffer-size W]` (SGLang's tp-size counts every GPU of the group; dp>1 is
          data-parallel attention, as vLLM's DP with a MoE model)
  moelab  `moelab serve M` (one GPU: tp = dp = 1, no ep)
Named strategies for --gpus N: tp (tp=N), ep (tp=N + ep), dp-ep (dp=N + ep), dp (dp=N). Explicit: "tp=2,dp=4,ep,eplb".
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ENGINES = ("vllm", "sglang", "moelab")
NAMED = ("tp", "ep", "dp-ep", "dp")


@dataclass(frozen=True)
class Strategy:
    tp: int = 1
    dp: int = 1
    ep: bool = False
    eplb: bool = False

    def __post_init__(self) -> None:
        if self.tp < 1 or self.dp < 1:
            raise ValueError(f"tp and dp must be >= 1, got tp={self.tp}, dp={self.dp}")
        if self.eplb and not self.ep:
            raise ValueError("eplb balances expert-parallel ranks: it needs ep")

    @property
    def gpus(self) -> int:
        return self.tp * self.dp

    @property
    def name(self) -> str:
        return "-".join([f"tp{self.tp}", f"dp{self.dp}"] + ["ep"] * self.ep + ["eplb"] * self.eplb)

    @classmethod
    def parse(cls, spec: str, gpus: int | None = None, eplb: bool = False) -> Strategy:
        """A named strategy (with gpus) or "tp=N,dp=N,ep,eplb" in any order; eplb=True adds eplb to ep ones."""
        if spec in NAMED:
            if not gpus:
                raise ValueError(f"strategy {spec!r} needs --gpus N (or spell it out, e.g. tp=4,ep)")
            s = {"tp": cls(tp=gpus), "ep": cls(tp=gpus, ep=True), "dp-ep": cls(dp=gpus, ep=True),
                 "dp": cls(dp=gpus)}[spec]
            return cls(s.tp, s.dp, s.ep, eplb and s.ep)
        fields: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if key in ("tp", "dp") and sep and value.isdigit():
                fields[key] = int(value)
            elif key in ("ep", "eplb") and not sep:
                fields[key] = True
            else:
                raise ValueError(f"strategy {spec!r}: cannot read {part!r}; use one of {', '.join(NAMED)} with "
                                 f"--gpus, or a comma list of tp=N, dp=N, ep, eplb")
        s = cls(**fields)
        return cls(s.tp, s.dp, s.ep, s.eplb or (eplb and s.ep))


@dataclass(frozen=True)
class EPLBOptions:
    num_redundant_experts: int = 0
    window_size: int | None = None  # vLLM window_size; SGLang expert-distribution-recorder-buffer-size
    step_interval: int | None = None  # vLLM step_interval; SGLang eplb-rebalance-num-iterations


DEFAULT_EXECUTABLES = {"vllm": ["vllm"], "sglang": ["python3", "-m", "sglang.launch_server"],
                       "moelab": [sys.executable, "-m", "moelab"]}


def build_command(engine: str, model: str, s: Strategy, host: str, port: int, served_name: str,
                  eplb: EPLBOptions = EPLBOptions(), extra: list[str] | None = None,
                  executable: list[str] | None = None) -> list[str]:
    """The exact argv that serves `model` under strategy `s` on `engine`."""
    exe = list(executable or DEFAULT_EXECUTABLES[engine])
    common = ["--host", host, "--port", str(port), "--served-model-name", served_name]
    if engine == "vllm":
        cmd = [*exe, "serve", model, *common, "--tensor-parallel-size", str(s.tp), "--data-parallel-size", str(s.dp)]
        if s.ep:
            cmd.append("--enable-expert-parallel")
        if s.eplb:
            cfg = {"num_redundant_experts": eplb.num_redundant_experts, "window_size": eplb.window_size,
                   "step_interval": eplb.step_interval}
            cmd += ["--enable-eplb", "--eplb-config", json.dumps({k: v for k, v in cfg.items() if v is not None})]
    elif engine == "sglang":
        cmd = [*exe, "--model-path", model, *common, "--tp-size", str(s.gpus)]
        if s.dp > 1:
            cmd += ["--dp-size", str(s.dp), "--enable-dp-attention"]
        if s.ep:
            cmd += ["--ep-size", str(s.gpus)]
        if s.eplb:
            cmd += ["--enable-eplb", "--ep-num-redundant-experts", str(eplb.num_redundant_experts)]
            if eplb.step_interval is not None:
                cmd += ["--eplb-rebalance-num-iterations", str(eplb.step_interval)]
            if eplb.window_size is not None:
                cmd += ["--expert-distribution-recorder-buffer-size", str(eplb.window_size)]
    elif engine == "moelab":
        if s != Strategy():
            raise ValueError(f"moelab serve runs on one GPU for now: strategy {s.name} is not available (use tp=1)")
        cmd = [*exe, "serve", model, *common]
    else:
        raise ValueError(f"engine {engine!r}; allowed: {', '.join(ENGINES)}")
    return cmd + list(extra or [])


def version_command(engine: str, executable: list[str] | None) -> list[str]:
    exe = list(executable or DEFAULT_EXECUTABLES[engine])
    if engine == "sglang" and "-m" in exe:
        return [exe[0], "-c", "import sglang; print(sglang.__version__)"]
    if engine == "moelab" and executable is None:
        return [sys.executable, "-c", "import moelab; print(moelab.__version__)"]
    return [*exe, "--version"]


def probe_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({type(err).__name__}: {err})"
    text = (out.stdout.strip() or out.stderr.strip()).splitlines()
    return text[-1] if out.returncode == 0 and text else f"unknown (exit {out.returncode})"


# ----- one server -----
@dataclass
class LaunchRecord:
    engine: str
    model: str
    served_model_name: str
    strategy: str
    tp: int
    dp: int
    ep: bool
    eplb: bool
    gpus: int
    command: list[str]
    command_line: str
    version: str
    base_url: str
    log_path: str | None = None
    startup_seconds: float | None = None
    models: list[str] | None = None
    exit_code: int | None = None


class LaunchError(RuntimeError):
    pass


def _tail(path: str | None, n: int = 20) -> str:
    if not path or not Path(path).is_file():
        return ""
    lines = Path(path).read_text(errors="replace").splitlines()[-n:]
    return "\n".join(lines)


def wait_ready(proc: subprocess.Popen, rec: LaunchRecord, timeout: float) -> None:
    """Until /health answers 200 (or the process exits, or timeout), then /v1/models must list the model."""
    t0 = time.monotonic()
    with httpx.Client(base_url=rec.base_url, timeout=5, trust_env=False) as c:
        while True:
            if proc.poll() is not None:
                raise LaunchError(f"{rec.engine} exited with code {proc.returncode} before /health answered; "
                                  f"log tail:\n{_tail(rec.log_path)}")
            try:
                if c.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - t0 > timeout:
                raise LaunchError(f"{rec.base_url}/health did not answer 200 within {timeout:g} s")
            time.sleep(0.25)
        rec.startup_seconds = time.monotonic() - t0
        r = c.get("/v1/models")
        if r.status_code != 200:
            raise LaunchError(f"{rec.base_url}/v1/models answered {r.status_code}: {r.text[:200]}")
        rec.models = [m.get("id") for m in r.json().get("data", [])]
    if rec.served_model_name not in rec.models:
        raise LaunchError(f"{rec.base_url}/v1/models serves {rec.models}, not the requested "
                          f"{rec.served_model_name!r}")


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM to the server's process group (it may have workers), SIGKILL after timeout; the exit code."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    return proc.returncode


@contextmanager
def running(rec: LaunchRecord, health_timeout: float, env: dict[str, str] | None = None):
    """Start rec.command (own session, output to rec.log_path), wait until ready, yield, always stop."""
    log = open(rec.log_path, "w") if rec.log_path else subprocess.DEVNULL  # closed in the finally below
    try:
        proc = subprocess.Popen(rec.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    except OSError as err:
        raise LaunchError(f"cannot start {rec.command[0]!r}: {err}") from None
    try:
        wait_ready(proc, rec, health_timeout)
        yield rec
    finally:
        rec.exit_code = stop(proc)
        if log is not subprocess.DEVNULL:
            log.close()


# ----- sweep -----
@dataclass
class LaunchConfig:
    engine: str
    model: str
    strategies: list[Strategy]
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    eplb: EPLBOptions = EPLBOptions()
    extra_args: list[str] | None = None
    executable: list[str] | None = None
    version_command: list[str] | None = None
    health_timeout: float = 1800.0
    log_dir: str = "moelab_launch_logs"
    bench_args: list[str] | None = None  # `moelab bench serve` flags, run against each server

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r}; allowed: {', '.join(ENGINES)}")
        if not self.strategies:
            raise ValueError("give at least one --strategy")


def record(cfg: LaunchConfig, s: Strategy, version: str) -> LaunchRecord:
    name = cfg.served_model_name or cfg.model
    cmd = build_command(cfg.engine, cfg.model, s, cfg.host, cfg.port, name, cfg.eplb, cfg.extra_args, cfg.executable)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return LaunchRecord(cfg.engine, cfg.model, name, s.name, s.tp, s.dp, s.ep, s.eplb, s.gpus, cmd, shlex.join(cmd),
                        version, f"http://{host}:{cfg.port}",
                        str(Path(cfg.log_dir) / f"{cfg.engine}-{s.name}.log"))


def run(cfg: LaunchConfig, store: Any = None, dry_run: bool = False, log: Any = print) -> list[dict]:
    """Every strategy in turn: start, check, (benchmark), stop. One store run of kind "launch" per strategy."""
    version = "not probed (dry run)" if dry_run else probe_version(cfg.version_command or
                                                                   version_command(cfg.engine, cfg.executable))
    records = [record(cfg, s, version) for s in cfg.strategies]
    if dry_run:
        for rec in records:
            log(f"# {rec.engine} {rec.strategy} ({rec.gpus} GPU)\n{rec.command_line}")
        return [asdict(r) for r in records]
    Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
    out = []
    for rec in records:
        log(f"launch {rec.engine} {rec.strategy}: {rec.command_line}")
        run_id = store.start_run("launch", _store_config(rec), {}) if store is not None else None
        bench: list[dict] = []
        try:
            with running(rec, cfg.health_timeout):
                log(f"ready in {rec.startup_seconds:.1f} s; serves {rec.models}")
                if cfg.bench_args is not None:
                    bench = _bench(cfg, rec, store)
        except Exception as err:
            if run_id is not None:
                store.finish_run(run_id, "failed", error=f"{type(err).__name__}: {err}",
                                 extra={"exit_code": rec.exit_code})
            raise
        if run_id is not None:
            store.add(run_id, [{"metric": "startup_seconds", "value": rec.startup_seconds, "unit": "s"}])
            store.finish_run(run_id, "ok", extra={"exit_code": rec.exit_code, "models": rec.models,
                                                  "bench_run_ids": [b.get("run_id") for b in bench]})
        out.append({**asdict(rec), "bench": [{k: v for k, v in b.items() if k != "detailed"} for b in bench]})
    return out


def _store_config(rec: LaunchRecord) -> dict[str, Any]:
    keys = ("engine", "model", "served_model_name", "strategy", "tp", "dp", "ep", "eplb", "gpus", "command_line",
            "version")
    return {k: getattr(rec, k) for k in keys}


def _bench(cfg: LaunchConfig, rec: LaunchRecord, store: Any) -> list[dict]:
    from moelab.lab import serving

    args = serving.build_parser().parse_args([*cfg.bench_args, "--base-url", rec.base_url, "--model",
                                              rec.served_model_name])
    bench_cfg = serving.config_from_args(args)
    bench_cfg.metadata.update({"engine": rec.engine, "strategy": rec.strategy, "engine_version": rec.version})
    return serving.run(bench_cfg, store)


# ----- command line -----
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moelab launch", description=__doc__.split("\n\n")[0])
    p.add_argument("engine", choices=ENGINES)
    p.add_argument("model", help="what the engine loads (HF id or local directory)")
    p.add_argument("--strategy", nargs="+", default=["tp=1"], help="named (tp, ep, dp-ep, dp; with --gpus) or "
                   "tp=N,dp=N,ep,eplb; several = a sweep")
    p.add_argument("--gpus", type=int, help="GPUs for the named strategies")
    p.add_argument("--served-model-name", help="the name to serve and check (default: MODEL)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    g = p.add_argument_group("expert-parallel load balancing")
    g.add_argument("--eplb", action="store_true", help="add EPLB to every strategy with ep")
    g.add_argument("--num-redundant-experts", type=int, default=0)
    g.add_argument("--eplb-window-size", type=int)
    g.add_argument("--eplb-step-interval", type=int)
    p.add_argument("--extra-args", default="", help="more engine flags, one shell-quoted string")
    p.add_argument("--executable", help="the engine command, shell-quoted (default: vllm / python3 -m "
                   "sglang.launch_server / python -m moelab)")
    p.add_argument("--version-command", help="shell-quoted command that prints the engine version")
    p.add_argument("--health-timeout", type=float, default=1800.0, help="seconds to wait for /health")
    p.add_argument("--log-dir", default="moelab_launch_logs")
    p.add_argument("--bench", dest="bench_args", help="run `moelab bench serve` with these flags (one quoted "
                   "string; --base-url and --model are set) against each server")
    p.add_argument("--dry-run", action="store_true", help="print the commands, start nothing")
    p.add_argument("--store", help="results store (default: $MOELAB_STORE or ./moelab_results.sqlite)")
    p.add_argument("--no-store", action="store_true")
    return p


def config_from_args(a: argparse.Namespace) -> LaunchConfig:
    strategies = [Strategy.parse(s, a.gpus, a.eplb) for s in a.strategy]
    eplb = EPLBOptions(a.num_redundant_experts, a.eplb_window_size, a.eplb_step_interval)
    return LaunchConfig(a.engine, a.model, strategies, a.served_model_name, a.host, a.port, eplb,
                        shlex.split(a.extra_args), shlex.split(a.executable) if a.executable else None,
                        shlex.split(a.version_command) if a.version_command else None, a.health_timeout, a.log_dir,
                        shlex.split(a.bench_args) if a.bench_args is not None else None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        store = None
        if not (args.no_store or args.dry_run):
            from moelab.lab.store import ResultsStore

            store = ResultsStore(args.store)
        results = run(cfg, store, dry_run=args.dry_run)
    except (ValueError, LaunchError) as err:
        print(f"moelab launch: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"launches": results}))
    return 0
