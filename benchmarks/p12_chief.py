"""P12: a chief oracle serving 64 simulated workers over real gRPC on loopback, and a tracking server under 64 writers.

Goal: ≥ 50 trials/s with p99 RPC latency ≤ 250 ms, and no lost metric.

**The chief.** A process of its own serves the toolkit's real oracle server
(:class:`toolkit.distributed.OracleServer`: the toolkit's servicer, its token check, 32 handler
threads) on 127.0.0.1 and a free port, over the random-search oracle of the quickstart card
(its space, seed and retry settings; ``tuner.max_trials`` 100000, so no worker is ever told to
stop). Like ``Chief._serve`` it polls the servicer's leases and ended trials every 0.25 s, and like
``Chief.__call__`` it mutes KerasTuner's display and stdout. The token reaches it through
``TOOLKIT_ORACLE_TOKEN``, as it reaches local workers.

**The workers.** ``--workers`` (64) simulated workers, spread over ``--procs`` processes (a
worker is a thread; the GIL makes processes the honest way to load a chief from one machine).
Each one does what a toolkit worker does, through the toolkit's own client code: the handshake
(:func:`toolkit.distributed.handshake`), a heartbeat thread (``_Heartbeat``, every 5 s), and
:class:`toolkit.distributed.WorkerClient` (KerasTuner's ``OracleClient`` over a channel that
carries the token and the tuner id), with a channel and a TCP connection of its own as in a
process of its own. Per zero-cost trial it makes the calls a worker makes around a trial:
``CreateTrial``, ``GetTrial`` (KerasTuner's ``_run_and_update_trial``), ``UpdateTrial`` with the
trial's metrics, ``EndTrial`` and ``GetBestTrials(1)`` (the toolkit's checkpoint pruning);
``--rpcs minimal`` keeps only Create, Update and End. All workers start together; trials/s counts
the trials ended within a ``--seconds`` window after a 2 s ramp, and each call's latency is timed
at the client. Every trial a worker ended must be COMPLETED at the chief with the score it
reported (no lost result). The chief measures its own side: time in each handler, time waiting for
and holding the oracle's lock, and KerasTuner's saves of the oracle's state (``Oracle.save``,
``_save_trial``); ``--profile`` adds a cProfile of every handler thread.

**The tracking server.** The toolkit's private ``mlflow server`` (:class:`toolkit.distributed.
TrackingServer`: one uvicorn worker over a new SQLite store, 127.0.0.1, a free port, under the
guard that stops it with this process). Under one parent run, 64 writers (over ``--procs``
processes) each create a nested trial run (tags and params as ``SearchTracker.start_trial`` logs
them), log ``--metrics`` metrics per step for ``--steps`` steps with the calls
``toolkit.tracking.log_metrics`` makes (one batched ``log_batch`` per step, as ``EpochLogger`` does
per epoch; each writer with a client and queue of its own, as in a worker process) and close the
run (``set_terminated``). The store is created first, as the local launcher does. ``sync`` waits for
each call (its latency is the server's); ``async`` is the toolkit's default per-epoch path (MLflow's
queue, drained when the run closes). Then every run's metric history is read back with
``MlflowClient`` and must hold every point, value for value.

Every process started here dies with this one (``PR_SET_PDEATHSIG``, the toolkit's
``_die_with_parent``; the tracking server under its guard). The machine is shared: the load
average is printed before and after, so compare figures from one run only.

    python benchmarks/p12_chief.py [--workers 64] [--procs 4] [--seconds 30] [--rpcs full|minimal]
        [--steps 10] [--metrics 4] [--tracking sync,async] [--deadline 45] [--profile]
        [--server-env KEY=VALUE ...] [--wal]     # levers to try on the tracking server
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness import PYTHON, ROOT, machine, verdict

sys.path.insert(0, str(ROOT))

GOAL_TRIALS_PER_S = 50.0
GOAL_P99_S = 0.250
RAMP = 2.0  # seconds after "go" before the window opens: every worker is past its first call
CARD = "quickstart"
MAX_TRIALS = 100_000  # the card's upper bound: no worker is told to stop within the window
PREFIX = "P12 "  # lines of the processes' protocol on their stdout
FULL = ("CreateTrial", "GetTrial", "UpdateTrial", "EndTrial", "GetBestTrials")
MINIMAL = ("CreateTrial", "UpdateTrial", "EndTrial")


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return f"load average: {_load()}"


def _percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (``q`` in 0-100) of ``values``; NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f} ms"


def _say(**message: Any) -> None:
    sys.__stdout__.write(PREFIX + json.dumps(message) + "\n")
    sys.__stdout__.flush()


def _wait_for_go() -> float:
    """Tell the parent this process is ready; return the monotonic time it says to start at."""
    _say(ready=True)
    line = sys.stdin.readline()
    if not line.startswith("go "):
        raise SystemExit("the benchmark's parent went away before the start")
    return float(line.split()[1])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------- the chief


class _TimedLock:
    """The oracle's lock, timing how long callers wait for it and hold it."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self.waited = 0.0
        self.held = 0.0
        self.taken = 0
        self._since = 0.0

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        started = time.perf_counter()
        ok = self._lock.acquire(*args, **kwargs)
        self._since = time.perf_counter()
        self.waited += self._since - started
        self.taken += 1
        return ok

    def release(self) -> None:
        self.held += time.perf_counter() - self._since
        self._lock.release()


class _Timer:
    """Seconds and calls per name, from any thread."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - started)

        return timed


def _card_oracle(workdir: Path) -> Any:
    """The quickstart card's random-search oracle, built as the toolkit's tuner builds it (its space from the card's model)."""
    import keras_tuner as kt

    from toolkit import models
    from toolkit.config import load_config
    from toolkit.data import load_dataset

    cfg = load_config(CARD, [f"tuner.max_trials={MAX_TRIALS}"], experiments_dir=ROOT / "experiments")
    dataset = load_dataset(cfg.data, cfg.seed)
    tuner = kt.RandomSearch(
        hypermodel=models.for_card(cfg, dataset),
        objective=kt.Objective(cfg.objective, direction=cfg.direction),
        max_trials=cfg.tuner.max_trials,
        seed=cfg.seed,
        directory=str(workdir),
        project_name=cfg.name,
        overwrite=True,
        max_retries_per_trial=cfg.tuner.max_retries_per_trial,
        max_consecutive_failed_trials=cfg.tuner.max_consecutive_failed_trials,
    )
    tuner.save()  # as Chief.__call__ does before serving
    return tuner.oracle


def serve_chief(out: Path, profile: bool) -> None:
    """The chief's process: serve the card's oracle until stdin closes, then write what it saw to ``out``."""
    import cProfile
    import io
    import pstats

    from keras_tuner.src.engine import oracle as oracle_module

    from toolkit.distributed import Address, OracleServer
    from toolkit.distributed.servicer import _Servicer
    from toolkit.security import read_token

    workdir = Path(tempfile.mkdtemp(prefix="p12-chief-"))
    oracle = _card_oracle(workdir)
    oracle.verbose = 0  # as Chief.__call__: progress is the chief's, not KerasTuner's tables
    timer = _Timer()
    lock = oracle_module.LOCKS[oracle] = _TimedLock(oracle_module.LOCKS[oracle])
    profiles: dict[int, cProfile.Profile] = {}
    handlers = ("GetSpace", "CreateTrial", "GetTrial", "UpdateTrial", "EndTrial", "GetBestTrials")

    def instrumented(name: str, fn: Any) -> Any:
        def handler(self: Any, request: Any, context: Any) -> Any:
            started = time.perf_counter()
            prof = None
            if profile:
                prof = profiles.setdefault(threading.get_ident(), cProfile.Profile())
                prof.enable()
            try:
                return fn(self, request, context)
            finally:
                if prof is not None:
                    prof.disable()
                timer.add(f"handler {name}", time.perf_counter() - started)

        return handler

    servicer_class = type("_TimedServicer", (_Servicer,), {n: instrumented(n, getattr(_Servicer, n)) for n in handlers})
    server = OracleServer(
        oracle,
        Address("127.0.0.1", 0),
        {"parent_run_id": "p12-parent", "search_id": "p12", "workdir": str(workdir)},
        token=read_token(),  # TOOLKIT_ORACLE_TOKEN, as the local launcher hands it to its chief
    )
    # OracleServer.start builds the toolkit's _Servicer from this module name: the timed subclass stands in.
    import toolkit.distributed.servicer as servicer_module

    servicer_module._Servicer = servicer_class
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # as Chief.__call__
        port = server.start()
        # Timed once the servicer is made (it may choose how the oracle saves), before any worker knows the port.
        oracle.save = timer.wrap("Oracle.save", oracle.save)
        oracle._save_trial = timer.wrap("Oracle._save_trial", oracle._save_trial)
        _say(port=port, pid=os.getpid())
        try:
            servicer = server.servicer
            while not stop.is_set():  # what Chief._serve does between calls
                servicer.expired(30.0)
                servicer.take_ended()
                servicer.done()
                stop.wait(0.25)
        finally:
            server.stop()
    trials = {tid: [str(t.status), None if t.score is None else float(t.score)] for tid, t in oracle.trials.items()}
    result: dict[str, Any] = {
        "trials": trials,
        "timer": {"seconds": timer.seconds, "calls": timer.calls},
        "lock": {"waited": lock.waited, "held": lock.held, "taken": lock.taken},
        "oracle_json_bytes": (workdir / CARD / "oracle.json").stat().st_size,
    }
    if profile and profiles:
        text = io.StringIO()
        stats = pstats.Stats(*profiles.values(), stream=text)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(30)
        result["profile"] = text.getvalue()
    out.write_text(json.dumps(result))


def run_workers(args: argparse.Namespace) -> None:
    """A process of simulated workers: ``args.threads`` workers, ids from ``args.first``, against the chief."""
    import random

    from toolkit.distributed import Address, handshake, worker_client
    from toolkit.distributed import auth as auth_module
    from toolkit.distributed.worker import _Heartbeat
    from toolkit.security import read_token

    # One connection per channel (gRPC otherwise shares one among a process's channels to one
    # address): the chief sees a connection per worker, as from worker processes of their own.
    auth_module.CHANNEL_OPTIONS = (*auth_module.CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1))
    from keras_tuner.src.distribute import oracle_client

    oracle_client.TIMEOUT = 60.0  # as run_worker bounds each call (TOOLKIT_ORACLE_TIMEOUT)
    oracle = Address.parse(args.oracle, "--oracle")
    token = read_token()
    ids = [f"tuner{i}" for i in range(args.first, args.first + args.threads)]
    clients, beats = [], []
    with worker_client(oracle, token) as cls:
        for tuner_id in ids:
            handshake(oracle, tuner_id, 120.0, token=token)
            beat = _Heartbeat(oracle, tuner_id, token=token)
            beat.start()
            beats.append(beat)
            os.environ["KERASTUNER_TUNER_ID"] = tuner_id  # WorkerClient reads its id from here
            client = cls(None)
            # The worker vets each trial against its own copy of the card's space.
            client._oracle = type("LocalOracle", (), {"hyperparameters": client.get_space()})()
            clients.append(client)
    kinds = FULL if args.rpcs == "full" else MINIMAL
    t0 = _wait_for_go()
    opens, closes = t0 + RAMP, t0 + RAMP + args.seconds
    latencies: dict[str, list[float]] = {k: [] for k in kinds}
    in_window: list[int] = [0] * len(clients)
    ended: list[list[tuple[str, float]]] = [[] for _ in clients]
    errors: list[str] = []

    def worker(i: int) -> None:
        client, tuner_id, rng = clients[i], ids[i], random.Random(i)
        while time.monotonic() < t0:  # all workers start together
            time.sleep(0.001)

        def call(kind: str, fn: Any, *a: Any) -> Any:
            started = time.monotonic()
            value = fn(*a)
            if opens <= started < closes:
                latencies[kind].append(time.monotonic() - started)
            return value

        try:
            while time.monotonic() < closes:
                trial = call("CreateTrial", client.create_trial, tuner_id)
                if trial.status in ("STOPPED", "IDLE"):
                    errors.append(f"{tuner_id}: the chief answered {trial.status}")
                    return
                if client.check_trial(trial) is not None:
                    errors.append(f"{tuner_id}: trial {trial.trial_id} outside the card's space")
                    return
                if "GetTrial" in kinds:
                    call("GetTrial", client.get_trial, trial.trial_id)
                score = rng.random()
                metrics = {"val_accuracy": score, "accuracy": rng.random(), "val_loss": rng.random(), "loss": rng.random()}
                call("UpdateTrial", client.update_trial, trial.trial_id, metrics, 0)
                trial.status = "COMPLETED"
                call("EndTrial", client.end_trial, trial)
                if opens <= time.monotonic() < closes:
                    in_window[i] += 1
                ended[i].append((trial.trial_id, score))
                if "GetBestTrials" in kinds:
                    call("GetBestTrials", client.get_best_trials, 1)
        except Exception as exc:  # reported, and the benchmark fails on it
            errors.append(f"{tuner_id}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,), name=ids[i]) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for beat in beats:
        beat.stop()
    for client in clients:
        client.close()
    Path(args.out).write_text(
        json.dumps(
            {"latencies": latencies, "in_window": sum(in_window), "ended": [e for per in ended for e in per], "errors": errors}
        )
    )


# ---------------------------------------------------------------------------------------- tracking


def _value(writer: int, step: int, metric: int) -> float:
    """The value writer ``writer`` logs for metric ``metric`` at ``step``: each point is known, to check it came back."""
    return writer * 1000.0 + step + metric / 10.0


def _metric_names(n: int) -> list[str]:
    names = ["loss", "val_loss", "accuracy", "val_accuracy"]
    return names[:n] + [f"metric_{i}" for i in range(len(names), n)]


def _own_client(uri: str) -> Any:
    """An ``MlflowClient`` with a store, and so an async queue, of its own.

    In the product a worker process runs one trial at a time, so its client's queue serves one
    run. MLflow keeps one store per URI and process, and closing a run flushes (shuts down and
    restarts) the whole queue: writer threads sharing it would wait for each other's points and
    race it (``cannot schedule new futures after shutdown``). Each writer here gets the queue a
    process of its own would have. The calls are toolkit.tracking's: ``log_batch`` per step, queued
    or not, and ``set_terminated``.
    """
    from functools import partial

    from mlflow import MlflowClient
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.tracking._tracking_service.client import TrackingServiceClient
    from mlflow.tracking._tracking_service.utils import get_default_host_creds

    store = RestStore(partial(get_default_host_creds, uri))
    own = type("OwnStoreClient", (TrackingServiceClient,), {"store": property(lambda self: store)})
    client = MlflowClient(uri)
    client._tracking_client = own(uri)
    return client


def run_writers(args: argparse.Namespace) -> None:
    """A process of ``args.threads`` writers, each a trial run under ``args.parent`` logging per-step metrics."""
    from mlflow.entities import Metric, Param

    names = _metric_names(args.metrics)
    ids = list(range(args.first, args.first + args.threads))
    sync = args.mode == "sync"
    t0 = _wait_for_go()
    log_calls: list[float] = []
    closes: list[float] = []
    runs: dict[str, str] = {}
    errors: list[str] = []
    finished: list[float] = []

    def writer(w: int) -> None:
        try:
            client = _own_client(args.uri)
            while time.monotonic() < t0:
                time.sleep(0.001)
            tags = {"mlflow.parentRunId": args.parent, "toolkit.role": "trial", "toolkit.trial_id": str(w), "toolkit.card": CARD}
            run_id = client.create_run(args.experiment, tags=tags, run_name=f"trial-{w}").info.run_id
            runs[str(w)] = run_id
            # As SearchTracker.start_trial: the trial's hyperparameters, queued.
            params = {"depth": 2, "units": 64, "activation": "relu", "learning_rate": 0.01}
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()], synchronous=False)
            for step in range(args.steps):
                if time.monotonic() > t0 + args.seconds:
                    errors.append(f"writer {w}: stopped at the deadline after {step} of {args.steps} steps")
                    break
                metrics = {name: _value(w, step, m) for m, name in enumerate(names)}
                started = time.monotonic()
                now = int(time.time() * 1000)  # as toolkit.tracking.log_metrics: one batched call
                client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()], synchronous=sync)
                log_calls.append(time.monotonic() - started)
            started = time.monotonic()
            client.set_terminated(run_id, status="FINISHED")  # drains MLflow's async queue first
            closes.append(time.monotonic() - started)
            finished.append(time.monotonic())
        except Exception as exc:
            errors.append(f"writer {w}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=writer, args=(w,)) for w in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    Path(args.out).write_text(
        json.dumps({"log_calls": log_calls, "closes": closes, "runs": runs, "errors": errors, "finished": finished})
    )


# ---------------------------------------------------------------------------------------- the parent


class _Children:
    """Processes of this benchmark: each dies with this one, and all are stopped on the way out."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        from toolkit.distributed.processes import _die_with_parent

        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [PYTHON, __file__, *argv],
            env={**os.environ, **env},
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    def read(self, name: str, proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
        """The next protocol line of a child, as a dict."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline().decode(errors="replace")
                if not line:
                    break
                if line.startswith(PREFIX):
                    return json.loads(line[len(PREFIX) :])
            elif proc.poll() is not None:
                break
        raise RuntimeError(f"{name} did not answer within {timeout:g}s; its log:\n{self.tail(name)}")

    def tail(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"

    def wait(self, name: str, proc: subprocess.Popen, timeout: float) -> None:
        code = proc.wait(timeout=timeout)
        if code != 0:
            raise RuntimeError(f"{name} exited with code {code}; its log:\n{self.tail(name)}")

    def stop_all(self) -> None:
        from toolkit.distributed.processes import _stop_group

        for _, proc in self.procs:
            _stop_group(proc, grace=5)


def _go(children: _Children, group: list[tuple[str, subprocess.Popen]], delay: float = 0.5) -> float:
    """Start a group together: wait until each is ready, then tell all the same start time."""
    for name, proc in group:
        if not children.read(name, proc, timeout=240).get("ready"):
            raise RuntimeError(f"{name} did not say it was ready")
    t0 = time.monotonic() + delay
    for _, proc in group:
        proc.stdin.write(f"go {t0}\n".encode())
        proc.stdin.flush()
    return t0


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    """(first id, count) of ``total`` items over ``parts`` groups."""
    out, first = [], 0
    for p in range(parts):
        n = total // parts + (1 if p < total % parts else 0)
        out.append((first, n))
        first += n
    return [(f, n) for f, n in out if n]


def bench_chief(args: argparse.Namespace, children: _Children, tmp: Path) -> tuple[bool, list[str]]:
    """The chief under ``args.workers`` simulated workers. Returns (goal met, the figures' lines)."""
    from toolkit.security import ENV_TOKEN, make_token

    env = {ENV_TOKEN: make_token()}  # through the environment, never argv, as the launcher does
    chief_out = tmp / "chief.json"
    chief_argv = ["--role", "chief", "--out", str(chief_out), *(["--profile"] if args.profile else [])]
    chief = children.start("chief", chief_argv, env)
    hello = children.read("chief", chief, timeout=240)
    port, chief_pid = hello["port"], hello["pid"]
    print(
        f"  chief: pid {chief_pid}, the toolkit's OracleServer on 127.0.0.1:{port} (token auth, random search, max_trials {MAX_TRIALS})"
    )
    group = []
    for first, n in _split(args.workers, args.procs):
        out = tmp / f"workers-{first}.json"
        argv = ["--role", "workers", "--oracle", f"127.0.0.1:{port}", "--first", str(first), "--threads", str(n)]
        argv += ["--seconds", str(args.seconds), "--rpcs", args.rpcs, "--out", str(out)]
        group.append((f"workers-{first}", children.start(f"workers-{first}", argv, env)))
    t0 = _go(children, group)
    opens, closes = t0 + RAMP, t0 + RAMP + args.seconds
    time.sleep(max(0.0, opens - time.monotonic()))
    cpu0 = {name: _cpu_seconds(p.pid) for name, p in [("chief", chief), *group]}
    wall0 = time.monotonic()
    time.sleep(max(0.0, closes - time.monotonic()))
    cpu1 = {name: _cpu_seconds(p.pid) for name, p in [("chief", chief), *group]}
    wall = time.monotonic() - wall0
    load_during = _load()
    for name, proc in group:
        children.wait(name, proc, timeout=120)
    chief.stdin.close()
    children.wait("chief", chief, timeout=60)

    seen = json.loads(chief_out.read_text())
    latencies: dict[str, list[float]] = {}
    done = 0
    ended: list[tuple[str, float]] = []
    errors: list[str] = []
    for first, _ in _split(args.workers, args.procs):
        part = json.loads((tmp / f"workers-{first}.json").read_text())
        for kind, values in part["latencies"].items():
            latencies.setdefault(kind, []).extend(values)
        done += part["in_window"]
        ended.extend(part["ended"])
        errors.extend(part["errors"])
    trials_per_s = done / args.seconds
    every = [v for values in latencies.values() for v in values]
    p99 = _percentile(every, 99)
    # No lost result: every trial a worker ended is COMPLETED at the chief with the score it reported.
    lost = [tid for tid, score in ended if seen["trials"].get(tid, [None])[0] != "COMPLETED" or seen["trials"][tid][1] != score]
    completed = sum(1 for status, _ in seen["trials"].values() if status == "COMPLETED")

    lines = [
        f"P12 chief: {args.workers} workers over {len(group)} processes, zero-cost trials, per trial {' → '.join(FULL if args.rpcs == 'full' else MINIMAL)}",
        f"  trials/s: {trials_per_s:.1f} ({done} trials ended in the {args.seconds:g} s window) — goal ≥ {GOAL_TRIALS_PER_S:g}: "
        f"{trials_per_s / GOAL_TRIALS_PER_S:.2f} × the goal, {verdict(trials_per_s, GOAL_TRIALS_PER_S, smaller_is_better=False)}",
        f"  p99 RPC latency, all calls: {_ms(p99)} (p50 {_ms(_percentile(every, 50))}, {len(every)} calls) — goal ≤ {_ms(GOAL_P99_S)}: "
        f"{p99 / GOAL_P99_S:.2f} × the limit, {verdict(p99, GOAL_P99_S)}",
    ]
    for kind in FULL:
        if latencies.get(kind):
            v = latencies[kind]
            lines.append(
                f"    {kind:<14} p50 {_ms(_percentile(v, 50)):>9}  p99 {_ms(_percentile(v, 99)):>9}  max {_ms(max(v)):>9}  ({len(v)} calls)"
            )
    lost_text = "none" if not lost else f"{len(lost)} (e.g. {lost[:5]})"
    lines.append(
        f"  results: {len(ended)} trials ended by the workers, {completed} COMPLETED at the chief, lost or changed: {lost_text}"
        + (f"; worker errors: {errors[:3]}" if errors else "")
    )
    cpu = {name: (cpu1[name] - cpu0[name]) / wall for name in cpu0}
    lines.append(
        f"  CPU in the window (cores busy): chief {cpu['chief']:.2f}, worker processes {sum(v for k, v in cpu.items() if k != 'chief'):.2f}, "
        f"of {os.cpu_count()} cores; load average during: {load_during}"
    )
    timer, lock = seen["timer"], seen["lock"]
    calls = max(1, timer["calls"].get("handler CreateTrial", 1))
    handled = sum(s for k, s in timer["seconds"].items() if k.startswith("handler "))
    lines.append(
        f"  chief side, whole run ({calls} trials created): handlers {handled:.1f} s of thread time; oracle lock held {lock['held']:.1f} s, "
        f"waited for {lock['waited']:.1f} s over {lock['taken']} takes"
    )
    for name in ("Oracle.save", "Oracle._save_trial"):
        if name in timer["seconds"]:
            s, n = timer["seconds"][name], timer["calls"][name]
            lines.append(
                f"    {name:<19} {n} calls, {s:.1f} s, {1000 * s / n:.2f} ms each ({100 * s / max(lock['held'], 1e-9):.0f}% of the lock's hold)"
            )
    for kind in ("GetSpace", *FULL):
        key = f"handler {kind}"
        if key in timer["seconds"]:
            s, n = timer["seconds"][key], timer["calls"][key]
            lines.append(f"    handler {kind:<14} {n} calls, {1000 * s / n:.2f} ms each (lock wait included)")
    lines.append(f"    oracle.json at the end: {seen['oracle_json_bytes'] / 1024:.0f} KiB (written whole on every save)")
    if "profile" in seen:
        (tmp / "chief-profile.txt").write_text(seen["profile"])
        lines.append(f"  cProfile of the chief's handler threads: {tmp / 'chief-profile.txt'}")
    ok = trials_per_s >= GOAL_TRIALS_PER_S and p99 <= GOAL_P99_S and not lost and not errors
    return ok, lines


def bench_tracking(args: argparse.Namespace, children: _Children, tmp: Path, mode: str) -> tuple[bool, list[str]]:
    """The private tracking server under ``args.workers`` writers. Returns (no metric lost, the figures' lines)."""
    from toolkit import tracking
    from toolkit.distributed import TrackingServer

    store = tmp / f"store-{mode}"
    backend = f"sqlite:///{store}/mlflow.db"
    # As the local launcher: the store is created (from MLflow's schema) before its server starts.
    tracking.ensure_store(backend)
    if args.wal:  # a lever to try: readers no longer block the writer's commit (the setting stays with the file)
        import sqlite3

        with contextlib.closing(sqlite3.connect(store / "mlflow.db")) as db:
            db.execute("PRAGMA journal_mode=WAL")
    server = TrackingServer(backend, artifacts=store / "artifacts", log_path=store / "mlflow-server.log")
    extra = dict(kv.split("=", 1) for kv in args.server_env)
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)  # the server inherits this process's environment
    started = time.monotonic()
    try:
        uri = server.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    boot = time.monotonic() - started
    killed: list[str] = []
    try:
        client = tracking.client(uri)
        experiment = client.create_experiment(f"p12-{mode}")
        parent = client.create_run(
            experiment, tags={"toolkit.role": "search", "toolkit.card": CARD}, run_name="search"
        ).info.run_id
        group = []
        for first, n in _split(args.workers, args.procs):
            out = tmp / f"writers-{mode}-{first}.json"
            argv = ["--role", "writers", "--uri", uri, "--experiment", experiment, "--parent", parent, "--mode", mode]
            argv += ["--first", str(first), "--threads", str(n), "--steps", str(args.steps), "--metrics", str(args.metrics)]
            argv += ["--seconds", str(args.deadline), "--out", str(out)]
            # MLflow's HTTP pool keeps 10 connections per process by default; these processes each
            # stand for several writers, so each writer keeps one, as in a process of its own.
            env = {"MLFLOW_HTTP_POOL_MAXSIZE": str(n)}
            group.append((f"writers-{mode}-{first}", children.start(f"writers-{mode}-{first}", argv, env)))
        t0 = _go(children, group)
        for name, proc in group:
            # Writers stop starting calls at the deadline; one still stuck 15 s later (MLflow's
            # queue draining failed batches) is killed, and what it had not written counts as lost.
            try:
                proc.wait(timeout=max(1.0, t0 + args.deadline + 15 - time.monotonic()))
            except subprocess.TimeoutExpired:
                from toolkit.distributed.processes import _stop_group

                _stop_group(proc, grace=2)
                killed.append(name)
        load_during = _load()
        log_calls: list[float] = []
        closes: list[float] = []
        runs: dict[str, str] = {}
        errors: list[str] = []
        last = t0
        for first, _ in _split(args.workers, args.procs):
            path = tmp / f"writers-{mode}-{first}.json"
            if not path.exists():
                continue
            part = json.loads(path.read_text())
            log_calls += part["log_calls"]
            closes += part["closes"]
            runs.update(part["runs"])
            errors += part["errors"]
            last = max([last, *part["finished"]])
        span = max(last - t0, 1e-9)
    finally:
        server.stop()

    # Read everything back, from the store itself once its server is gone (as the chief closes its
    # runs when its server dies), so a wedged server cannot hide or delay what was stored: every
    # writer's run, every point of every curve, value for value.
    from mlflow import MlflowClient

    reader = MlflowClient(backend)
    reader.set_terminated(parent, status="FINISHED")
    names = _metric_names(args.metrics)
    children_runs = reader.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=10_000)
    by_writer = {r.data.tags.get("toolkit.trial_id"): r for r in children_runs}
    expected_points = args.workers * args.steps * args.metrics
    found = 0
    wrong: list[str] = []
    for w in range(args.workers):
        run = by_writer.get(str(w))
        for m, name in enumerate(names):
            got = sorted((p.step, p.value) for p in reader.get_metric_history(run.info.run_id, name)) if run else []
            found += len(got)
            if got != [(step, _value(w, step, m)) for step in range(args.steps)]:
                wrong.append(f"writer {w} {name}: {len(got)} points")
    unfinished = [r.info.run_id for r in children_runs if r.info.status != "FINISHED"]
    calls = len(log_calls)
    p99 = _percentile(log_calls, 99)
    what = (
        "each step's call waits for the server"
        if mode == "sync"
        else "the toolkit's default: MLflow's async queue, drained at close"
    )
    lines = [
        f"P12 tracking ({mode}: {what}): {args.workers} writers over {len(group)} processes, one nested run each, "
        f"{args.metrics} metrics × {args.steps} steps; server started in {boot:.1f} s",
        f"  writes/s: {found / span:.0f} metric points/s stored, {calls / span:.0f} log calls/s ({found} points stored, {calls} calls "
        f"returned, from the start to the last run closed: {span:.1f} s)",
        f"  log call latency: p50 {_ms(_percentile(log_calls, 50))}, p99 {_ms(p99)}, max {_ms(max(log_calls) if log_calls else float('nan'))}"
        + (f" — against the chief's ≤ {_ms(GOAL_P99_S)}: {p99 / GOAL_P99_S:.2f} ×" if mode == "sync" else ""),
        f"  closing a run (set_terminated{', queue drained' if mode == 'async' else ''}): p50 {_ms(_percentile(closes, 50))}, p99 {_ms(_percentile(closes, 99))}",
        f"  read back: {len(children_runs)} of {args.workers} nested runs, {found} of {expected_points} points "
        f"({expected_points - found} lost), {len(wrong)} curves not as logged{f' (e.g. {wrong[:2]})' if wrong else ''}; "
        f"runs not FINISHED: {len(unfinished)}; writer errors: {len(errors)}{' (' + errors[0][:200] + ')' if errors else ''}"
        + (f"; killed past the deadline: {killed}" if killed else "")
        + f"; load average during: {load_during}",
    ]
    if extra or args.wal:
        lines.insert(1, f"  lever: {' '.join(args.server_env)}{' SQLite journal_mode=WAL' if args.wal else ''}")
    ok = (
        found == expected_points
        and not wrong
        and len(children_runs) == args.workers
        and not unfinished
        and not errors
        and not killed
    )
    lines.append(f"  no lost metric: {'yes' if ok else 'NO'}")
    return ok, lines


def main(args: argparse.Namespace) -> int:
    # TensorFlow's start-up chatter (this process loads the toolkit's process helpers), and MLflow's
    # run links (as the local launcher mutes them), stay out of the figures; children inherit both.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    print(
        f"P12: a chief oracle under {args.workers} simulated workers over gRPC on loopback, and the tracking server under {args.workers} writers"
    )
    print(f"machine: {machine()}")
    print(f"before: {_uptime()}")
    command = [PYTHON, "benchmarks/p12_chief.py", *sys.argv[1:]]
    tmp = Path(tempfile.mkdtemp(prefix="p12-"))
    children = _Children(tmp)
    lines: list[str] = []
    oks: list[bool] = []
    try:
        ok, part = bench_chief(args, children, tmp)
        oks.append(ok)
        lines += part
        print("\n".join(part), flush=True)
        for mode in [m for m in args.tracking.split(",") if m]:
            try:
                ok, part = bench_tracking(args, children, tmp, mode)
            except Exception as exc:  # a server too wedged to read back: the figure is a miss, not a crash
                ok, part = False, [f"P12 tracking ({mode}): the check could not finish: {type(exc).__name__}: {str(exc)[:300]}"]
            oks.append(ok)
            lines += part
            print("\n".join(part), flush=True)
    finally:
        children.stop_all()
    print(f"after: {_uptime()}")
    print(f"scratch (logs, profile): {tmp}")
    print(f"reproduce: cd {ROOT} && {shlex.join(command)}")
    print(
        f"P12 {'meets' if all(oks) else 'MISSES'} the goal (≥ {GOAL_TRIALS_PER_S:g} trials/s, p99 ≤ {_ms(GOAL_P99_S)}, no lost metric)"
    )
    return 0


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=64, help="simulated workers and tracking writers (default 64)")
    parser.add_argument("--procs", type=int, default=4, help="processes they are spread over (default 4)")
    parser.add_argument("--seconds", type=float, default=30.0, help="the chief's measuring window (default 30)")
    parser.add_argument(
        "--rpcs", choices=["full", "minimal"], default="full", help="the calls per trial (default: a worker's full set)"
    )
    parser.add_argument("--steps", type=int, default=10, help="steps (epochs) each tracking writer logs (default 10)")
    parser.add_argument("--metrics", type=int, default=4, help="metrics per step (default 4)")
    parser.add_argument("--tracking", default="sync,async", help="tracking modes to run, of sync,async; '' for none")
    parser.add_argument("--deadline", type=float, default=45.0, help="seconds the writers of each tracking mode get (default 45)")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the tracking server, to try a lever",
    )
    parser.add_argument("--wal", action="store_true", help="put the tracking store in SQLite's WAL mode, to try a lever")
    parser.add_argument("--profile", action="store_true", help="cProfile the chief's handler threads")
    # The processes this benchmark starts run this file again in one of these roles.
    parser.add_argument("--role", choices=["chief", "workers", "writers"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--oracle", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--experiment", help=argparse.SUPPRESS)
    parser.add_argument("--parent", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = _parse()
    if arguments.role == "chief":
        serve_chief(Path(arguments.out), arguments.profile)
    elif arguments.role == "workers":
        run_workers(arguments)
    elif arguments.role == "writers":
        run_writers(arguments)
    else:
        sys.exit(main(arguments))
