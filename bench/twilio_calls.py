"""Benchmark: N concurrent Twilio `both_tracks` calls through one live gateway process.

Processes (all on loopback):

* the gateway: ``gateway serve`` -- the process measured -- with the AssemblyAI engine pointed at
* a peer: ``gateway stt-server --engine scripted`` (a two-word turn every 3 s, so finals flow);
* the callers: this file's ``_simulate`` role, ``simulate_calls`` playing a real two-party call
  (``samples/diane_sheila.wav``, looped to length) at real time, 20 ms µ-law frames on both
  tracks, signed like Twilio, the calls' starts spread over ``--ramp`` s (default max(5, N/25)).

The gateway is pinned to one core (``--gateway-core``, default 0), everything else -- the peer,
the callers and this script -- to the others (default: all the other cores), so "on one core" is
literal. After one warm-up call the baseline is taken; then the N calls start, and the window
(``--seconds``) opens ``--settle`` s after the last start. Over the window the gateway's CPU
(utime + stime / wall, from /proc) and memory (VmRSS median - baseline, and its growth) are
measured, and from its ``/metrics`` (scraped every second from a thread) the delay from the
arrival of a chunk's last audio frame to the chunk leaving on the STT socket
(``callgate_stt_send_delay_seconds``: bucketed, so percentiles are interpolated within the
buckets; the last finite bucket is 2 s). With ``--first-frame-delay`` the gateway also records
the delay from a chunk's *first* frame (it includes waiting for the 100 ms chunk to fill) in a
histogram this script adds to it at startup (a little extra work in the gateway).

Falling behind real time shows as: fewer than 100 frames handled per call-second, the send delay
growing across the window, /metrics answered late (the event loop is behind), the core at
~100 %, callers finishing late or not completing (1006: the close handshake timed out), STT
reconnects (handshakes time out on a late loop), stream errors (``rate_exceeded``). Busy time on
the gateway's core from anything else is reported (``other_cpu_on_gateway_core_percent``,
approximate: /proc/stat ticks) and flagged as DISTURBED above 5 %.

    .venv/bin/python bench/twilio_calls.py [--calls 50,200,500] [--seconds 30] [--json FILE]

Targets (issue): 500 calls on one core without falling behind real time; <= 1 MiB per call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FRAME_MS = 20
FRAMES_PER_CALL_S = 2 * 1000 // FRAME_MS  # both tracks
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
AUTH_TOKEN = "bench-twilio-auth-token"
DELAY_TOP_MS = 2000.0  # the last finite bucket of callgate_stt_send_delay_seconds

# Run inside the gateway with --first-frame-delay: a second histogram, fed from the same per-chunk
# hook as callgate_stt_send_delay_seconds, of the delay from a chunk's FIRST frame.
_FIRST_FRAME_BOOTSTRAP = """
import sys
from prometheus_client import Histogram
import gateway.observability.metrics as m
import gateway.stt.assemblyai as a

_init = m.Metrics.__init__
_first = []

def __init__(self):
    _init(self)
    bounds = getattr(self.stt_send_delay, "_upper_bounds", [0.005, 0.01, 0.05, 0.1, 1.0, 2.0])
    buckets = [b for b in bounds if b != float("inf")]
    _first.append(Histogram(
        "bench_stt_send_delay_from_first_seconds",
        "(bench) From the arrival of a chunk's first audio frame to the chunk on the STT socket",
        buckets=sorted(set(buckets) | {0.08, 0.09, 0.11, 0.12, 0.13, 0.25}),
        registry=self.registry,
    ))

m.Metrics.__init__ = __init__

def _get(self):
    return self.__dict__.get("_bench_hook")

def _set(self, hook):
    if hook is None:
        self.__dict__["_bench_hook"] = None
        return
    observe = _first[-1].observe

    def both(first_s, last_s):
        hook(first_s, last_s)
        observe(first_s)

    self.__dict__["_bench_hook"] = both

a.AssemblyAIEngine.on_chunk_sent = property(_get, _set)
"""

# Run inside the gateway with --profile: cProfile over the whole process, stats dumped at exit.
_PROFILE_BOOTSTRAP = """
import atexit, cProfile
_profile = cProfile.Profile()
atexit.register(lambda: _profile.dump_stats(PROFILE_PATH))
_profile.enable()
"""

_MAIN = """
import sys
from gateway.cli import main
sys.argv[0] = "gateway"
raise SystemExit(main())
"""


def add_profile_option(parser: argparse.ArgumentParser) -> None:
    """``--profile DIR``: the gateway under cProfile (:func:`gateway_command`), for every bench
    built on this harness."""
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run the gateway under cProfile; stats in DIR/gateway-N.prof (slows it down)",
    )


def gateway_command(first_frame: bool, profile: Path | None) -> list[str]:
    """``gateway serve``, or the same through a bootstrap that instruments or profiles it."""
    if not first_frame and profile is None:
        return [sys.executable, "-m", "gateway"]
    code = _FIRST_FRAME_BOOTSTRAP if first_frame else ""
    if profile is not None:
        code += _PROFILE_BOOTSTRAP.replace("PROFILE_PATH", repr(str(profile)))
    return [sys.executable, "-c", code + _MAIN]


# -- the callers (a child process) ---------------------------------------------------------------


def _looped(audio: Any, seconds: float) -> Any:
    from gateway.simulate.twilio import CallAudio

    samples = int(seconds * audio.sample_rate)

    def loop(pcm: bytes | None) -> bytes | None:
        if pcm is None:
            return None
        reps = -(-2 * samples // len(pcm))
        return (pcm * reps)[: 2 * samples]

    return CallAudio(audio.sample_rate, loop(audio.inbound) or b"", loop(audio.outbound))


async def _simulate(args: argparse.Namespace) -> None:
    """Warm the gateway up with one short call, wait for "go" on stdin, play the N calls."""
    from gateway.simulate.twilio import (
        SimulationOptions,
        load_call_audio,
        prepare_audio,
        simulate_calls,
    )

    options = SimulationOptions(speed=1.0, frame_ms=FRAME_MS)
    audio = await load_call_audio(Path(args.audio))
    wire = await prepare_audio(_looped(audio, args.audio_seconds), options)
    warm = await prepare_audio(_looped(audio, 3.0), options)
    (res,) = await simulate_calls(1, args.url, warm, options, auth_token=AUTH_TOKEN)
    print(json.dumps({"warm": res.completed, "close_code": res.close_code}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)

    loop = asyncio.get_running_loop()
    lags: list[float] = []
    running = True

    async def monitor() -> None:
        # How late this process's event loop wakes up: if the callers cannot keep their
        # schedule, the gateway is not getting real-time load.
        while running:
            due = loop.time() + 0.05
            await asyncio.sleep(0.05)
            lags.append(loop.time() - due)

    watcher = asyncio.create_task(monitor())
    t0 = time.monotonic()
    results = await simulate_calls(
        args.calls,
        args.url,
        wire,
        options,
        auth_token=AUTH_TOKEN,
        stagger_s=args.ramp / args.calls,
    )
    running = False
    await watcher
    behind = [r.elapsed_s - r.audio_ms / 1000 for r in results]
    lags.sort()
    print(
        json.dumps(
            {
                "calls": len(results),
                "completed": sum(r.completed for r in results),
                "close_codes": dict(Counter(str(r.close_code) for r in results)),
                "close_reasons": dict(Counter(r.close_reason for r in results if r.close_reason)),
                "errors": dict(Counter(r.error for r in results if r.error)),
                "rejected": dict(
                    Counter(str(r.rejected_status) for r in results if r.rejected_status)
                ),
                "audio_s": round(max(r.audio_ms for r in results) / 1000, 2),
                "overrun_s_median": round(statistics.median(behind), 3),
                "overrun_s_max": round(max(behind), 3),
                "loop_lag_ms_p99": round(1000 * lags[int(0.99 * (len(lags) - 1))], 1)
                if lags
                else None,
                "loop_lag_ms_max": round(1000 * lags[-1], 1) if lags else None,
                "wall_s": round(time.monotonic() - t0, 1),
            }
        ),
        flush=True,
    )


# -- processes -----------------------------------------------------------------------------------


class Child:
    """A subprocess whose stdout lines are read by a thread (so reads can time out)."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        *,
        cores: set[int],
        env: dict[str, str],
        stderr: IO[bytes] | int | None,
        stdin: bool = False,
    ) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        self.cores = cores
        pin(self.proc.pid, cores)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def readline(self, timeout: float, what: str) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.name}: no {what} within {timeout:.0f} s") from None
        if line is None:
            raise RuntimeError(f"{self.name} exited ({self.proc.wait()}) before {what}")
        return line

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def pin(pid: int, cores: set[int]) -> None:
    """Pin every thread of ``pid`` to ``cores`` (threads made later inherit it)."""
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(tid), cores)


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def mem_kib(pid: int, key: str) -> int:
    """A /proc/PID/status line (VmRSS, VmHWM) in KiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def core_busy_s() -> dict[int, float]:
    """Busy seconds of each core since boot, from /proc/stat."""
    out = {}
    with open("/proc/stat") as fh:
        for line in fh:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                # user nice system idle iowait irq softirq steal: busy is all but idle, iowait
                # and steal (time the hypervisor gave to other guests).
                ticks = [int(v) for v in values[:8]]
                out[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4] - ticks[7]) / CLK_TCK
    return out


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it): 500 calls = 1500 sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


# -- metrics -------------------------------------------------------------------------------------


@dataclass
class Scrape:
    at: float
    took: float = 0.0
    """Seconds the gateway took to answer: its event loop's responsiveness under load."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        """Sum of every series of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.samples.items() if n == name and want <= set(lab))

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {lab: v for (n, lab), v in self.samples.items() if n == name}

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """``(upper bound, cumulative count)`` of a histogram, sorted."""
        out = [
            (float(dict(lab)["le"]), v)
            for (n, lab), v in self.samples.items()
            if n == name + "_bucket"
        ]
        return sorted(out)


def scrape(base: str) -> Scrape:
    from prometheus_client.parser import text_string_to_metric_families

    t0 = time.monotonic()
    with urllib.request.urlopen(f"{base}/metrics", timeout=60) as resp:
        text = resp.read().decode()
    out = Scrape(time.monotonic(), time.monotonic() - t0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def histogram_delta(before: Scrape, after: Scrape, name: str) -> list[tuple[float, float]]:
    b = dict(before.buckets(name))
    return [(le, count - b.get(le, 0.0)) for le, count in after.buckets(name)]


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus-style ``histogram_quantile``: linear interpolation inside the bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if le == float("inf"):
                return lower  # beyond the last finite bound: report that bound
            inside = cumulative - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, cumulative
    return lower


def ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 2)


# -- one run -------------------------------------------------------------------------------------


def stt_script(seconds: float) -> list[list[list[object]]]:
    """A two-word turn every 3 s of each session's audio (as bench/stt_sessions.py)."""
    return [
        [["word", t * 1000 + 200, t * 1000 + 500], ["again", t * 1000 + 550, t * 1000 + 900]]
        for t in range(0, int(seconds) - 1, 3)
    ]


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without its ``GATEWAY_*`` settings, plus ``extra``.

    A setting to try in every bench child (A/B runs) is given as ``BENCH_GATEWAY_<NAME>``, which
    becomes ``GATEWAY_<NAME>`` (after ``extra``, so it wins)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    env.update(extra)
    for key, value in os.environ.items():
        if key.upper().startswith("BENCH_GATEWAY_"):
            env[key[len("BENCH_") :]] = value
    return env


@dataclass
class ProcSample:
    at: float
    gw_cpu: float
    load_cpu: float
    rss_kib: int
    cores: dict[int, float]


class Scraper:
    """Scrapes ``/metrics`` about once a second in a thread, so that a gateway slow to answer
    (itself a sign of falling behind) does not hold up the /proc sampling schedule."""

    def __init__(self, base: str, interval: float = 1.0) -> None:
        self.base = base
        self.interval = interval
        self.scrapes: list[Scrape] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.scrapes.append(scrape(self.base))
            except OSError as exc:
                self.error = repr(exc)
            self._stop.wait(max(0.0, t0 + self.interval - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(70)


@dataclass
class Measured:
    """One run of every bench's timeline (:func:`measure_window`)."""

    baseline: Scrape
    final: Scrape
    base_proc: ProcSample
    procs: list[ProcSample]
    scrapes: list[Scrape]
    window: tuple[float, float]
    hwm_kib: int  # VmHWM at the window's end
    sim_result: dict[str, Any]
    go: float = 0.0  # when the calls were told to start
    fds_baseline: int = 0
    fds_steady: int = 0  # at the first sample inside the window
    loadavg_window_end: str = ""
    hwm_after_kib: int = 0  # VmHWM and VmRSS once the calls have ended
    rss_after_kib: int = 0
    scrape_error: str | None = None


@dataclass
class WindowFigures:
    """The gateway over the window, from :class:`Measured` (:func:`window_figures`)."""

    wall: float
    gw_cpu: float
    load_cpu: float
    steady_rss: float
    core_other: float
    m0: Scrape | None
    m1: Scrape | None


def measure_window(
    gw: Child,
    peer: Child,
    sim: Child,
    base: str,
    gw_cores: set[int],
    *,
    ramp_s: float,
    settle: float,
    seconds: float,
    audio_s: float,
    linger_s: float = 2.0,
) -> Measured:
    """After the simulator's warm-up call (and ``linger_s`` for it to be stored): take the
    baseline, say "go", sample /proc every second over the window while /metrics is scraped
    from a thread (a saturated gateway answers late, and that must not hold up the sampling),
    read the simulator's result, let the calls end, then stop the gateway and the peer."""
    warm = json.loads(sim.readline(60, "warm-up call"))
    if not warm["warm"]:
        raise RuntimeError(f"the warm-up call did not complete: {warm}")
    time.sleep(linger_s)
    pin(gw.proc.pid, gw_cores)
    load_pids = [peer.proc.pid, sim.proc.pid, os.getpid()]

    def sample() -> ProcSample:
        return ProcSample(
            time.monotonic(),
            cpu_s(gw.proc.pid),
            sum(cpu_s(p) for p in load_pids),
            mem_kib(gw.proc.pid, "VmRSS"),
            core_busy_s(),
        )

    baseline = scrape(base)
    base_proc = sample()
    fds_baseline = fds(gw.proc.pid)
    scraper = Scraper(base)
    try:
        sim.send("go\n")
        go = time.monotonic()
        # A fixed timeline: calls start over [go, go + ramp]; the window opens `settle` seconds
        # after the last start, whether or not the gateway has them all up.
        window_at = go + ramp_s + settle
        window_end = window_at + seconds
        procs = [sample()]
        fds_steady = 0
        while (now := time.monotonic()) < window_end:
            time.sleep(min(1.0, window_end - now))
            procs.append(sample())
            if not fds_steady and procs[-1].at >= window_at:
                fds_steady = fds(gw.proc.pid)
        hwm = mem_kib(gw.proc.pid, "VmHWM")
        load = loadavg()
        sim_result = json.loads(sim.readline(audio_s + 180, "simulation result"))
    finally:
        scraper.stop()
    # Let the calls end (redirect grace), drain their STT sessions and be stored.
    deadline = time.monotonic() + 120
    final = scrape(base)
    while time.monotonic() < deadline and final.value("callgate_calls_active") > 0:
        time.sleep(0.5)
        final = scrape(base)
    time.sleep(1.0)
    final = scrape(base)
    hwm_after = mem_kib(gw.proc.pid, "VmHWM")
    rss_after = mem_kib(gw.proc.pid, "VmRSS")
    gw.stop(timeout=60)
    peer.stop()
    return Measured(
        baseline,
        final,
        base_proc,
        procs,
        scraper.scrapes,
        (window_at, window_end),
        hwm,
        sim_result,
        go=go,
        fds_baseline=fds_baseline,
        fds_steady=fds_steady,
        loadavg_window_end=load,
        hwm_after_kib=hwm_after,
        rss_after_kib=rss_after,
        scrape_error=scraper.error,
    )


def window_figures(m: Measured, gw_cores: set[int]) -> WindowFigures:
    window_at, window_end = m.window
    in_window = [p for p in m.procs if p.at >= window_at - 0.5]
    if len(in_window) < 2:
        in_window = m.procs[-2:]
    p0, p1 = in_window[0], in_window[-1]
    wall = max(p1.at - p0.at, 1e-3)
    gw_cpu = (p1.gw_cpu - p0.gw_cpu) / wall
    # Scrapes begun in the window and answered by its end (a late gateway answers none).
    usable = [
        sc for sc in m.scrapes if sc.at - sc.took >= window_at - 0.5 and sc.at <= window_end + 0.5
    ]
    m0, m1 = (usable[0], usable[-1]) if len(usable) >= 2 else (None, None)
    return WindowFigures(
        wall=wall,
        gw_cpu=gw_cpu,
        load_cpu=(p1.load_cpu - p0.load_cpu) / wall,
        steady_rss=statistics.median(p.rss_kib for p in in_window),
        core_other=sum((p1.cores[c] - p0.cores[c]) / wall for c in gw_cores) - gw_cpu,
        m0=m0,
        m1=m1,
    )


def labelled_delta(before: Scrape, after: Scrape, name: str, key: str) -> dict[str, int]:
    """How much counter ``name`` grew between two scrapes, summed by its label ``key``."""
    start = before.series(name)
    out: dict[str, int] = {}
    for lab, v in after.series(name).items():
        d = int(v - start.get(lab, 0.0))
        if d:
            value = dict(lab).get(key, "?")
            out[value] = out.get(value, 0) + d
    return out


def log_warnings(path: Path) -> list[str]:
    """The warning, error and traceback lines of a child's log."""
    return [
        line
        for line in path.read_text(errors="replace").splitlines()
        if "warning" in line.lower() or "error" in line.lower() or "Traceback" in line
    ]


def run_one(
    n: int, args: argparse.Namespace, gw_cores: set[int], load_cores: set[int]
) -> dict[str, Any]:
    ramp_s = args.ramp if args.ramp is not None else max(5.0, n / 25)
    audio_s = ramp_s + args.settle + args.seconds + args.tail
    script_turns = stt_script(audio_s)
    children: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="callgate-bench-") as tmp:
        script_path = Path(tmp) / "script.json"
        script_path.write_text(json.dumps(script_turns))
        gw_log_path = Path(tmp) / "gateway.log"
        peer_log_path = Path(tmp) / "peer.log"
        try:
            with open(gw_log_path, "wb") as gw_log, open(peer_log_path, "wb") as peer_log:
                quiet = {"GATEWAY_LOGGING__LEVEL": "warning", "GATEWAY_LOGGING__FORMAT": "json"}
                peer = Child(
                    "stt-server",
                    [
                        sys.executable,
                        "-m",
                        "gateway",
                        "stt-server",
                        "--engine",
                        "scripted",
                        "--script",
                        str(script_path),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "0",
                    ],
                    cores=load_cores,
                    env=clean_env(quiet),
                    stderr=peer_log,
                )
                children.append(peer)
                stt_url = peer.readline(60, "listening line").strip().rsplit(" ", 1)[-1]
                gw_env = clean_env(
                    {
                        **quiet,
                        "GATEWAY_STT__ENGINE": "assemblyai",
                        "GATEWAY_STT__ASSEMBLYAI__URL": stt_url,
                        "GATEWAY_SERVER__MAX_CALLS": str(n + 10),
                        "GATEWAY_SERVER__DATA_DIR": str(Path(tmp) / "data"),
                        "GATEWAY_TWILIO__AUTH_TOKEN": AUTH_TOKEN,
                    }
                )
                profile = args.profile / f"gateway-{n}.prof" if args.profile else None
                cmd = [*gateway_command(args.first_frame_delay, profile), "serve"]
                cmd += ["--host", "127.0.0.1", "--port", "0"]
                gw = Child("gateway", cmd, cores=gw_cores, env=gw_env, stderr=gw_log)
                children.append(gw)
                while "serving on" not in (line := gw.readline(120, "serving banner")):
                    pass
                port = int(line.rsplit(":", 1)[1])
                base = f"http://127.0.0.1:{port}"
                pin(gw.proc.pid, gw_cores)
                sim = Child(
                    "simulator",
                    [
                        sys.executable,
                        __file__,
                        "_simulate",
                        "--url",
                        f"ws://127.0.0.1:{port}/twilio/stream",
                        "--calls",
                        str(n),
                        "--audio",
                        str(args.audio),
                        "--audio-seconds",
                        str(audio_s),
                        "--ramp",
                        str(ramp_s),
                    ],
                    cores=load_cores,
                    env=clean_env({}),
                    stderr=None,
                    stdin=True,
                )
                children.append(sim)
                # The warm-up call lingers (redirect grace), then is stored.
                m = measure_window(
                    gw,
                    peer,
                    sim,
                    base,
                    gw_cores,
                    ramp_s=ramp_s,
                    settle=args.settle,
                    seconds=args.seconds,
                    audio_s=audio_s,
                    linger_s=3.0,
                )
            gw_warnings = log_warnings(gw_log_path)
            peer_warnings = log_warnings(peer_log_path)
        finally:
            for child in reversed(children):
                child.stop(timeout=10)

    return summarize(
        n,
        ramp_s=ramp_s,
        go=m.go,
        window=m.window,
        procs=m.procs,
        base_proc=m.base_proc,
        scrapes=m.scrapes,
        baseline=m.baseline,
        final=m.final,
        sim=m.sim_result,
        script_turns=script_turns,
        gw_cores=gw_cores,
        extra={
            "rss_peak_window_mib": round(m.hwm_kib / 1024, 1),
            "rss_peak_mib": round(m.hwm_after_kib / 1024, 1),
            "rss_after_calls_mib": round(m.rss_after_kib / 1024, 1),
            "fds_baseline": m.fds_baseline,
            "fds_steady": m.fds_steady,
            "gateway_log_warnings": len(gw_warnings),
            "gateway_log_sample": gw_warnings[:3],
            "peer_log_warnings": len(peer_warnings),
            "peer_log_sample": peer_warnings[:3],
            "scrape_error": m.scrape_error,
            "loadavg_at_window_end": m.loadavg_window_end,
        },
    )


def summarize(
    n: int,
    *,
    ramp_s: float,
    go: float,
    window: tuple[float, float],
    procs: list[ProcSample],
    base_proc: ProcSample,
    scrapes: list[Scrape],
    baseline: Scrape,
    final: Scrape,
    sim: dict[str, Any],
    script_turns: list[list[list[object]]],
    gw_cores: set[int],
    extra: dict[str, Any],
) -> dict[str, Any]:
    start, end = window
    in_window = [p for p in procs if p.at >= start - 0.5]
    p0, p1 = in_window[0], in_window[-1]
    wall = p1.at - p0.at
    gw_cpu = (p1.gw_cpu - p0.gw_cpu) / wall
    load_cpu = (p1.load_cpu - p0.load_cpu) / wall
    steady_rss = statistics.median(p.rss_kib for p in in_window)
    # Memory growth while the calls go on (per call, per minute of call): a least-squares slope.
    tm = statistics.fmean(p.at for p in in_window)
    rm = statistics.fmean(p.rss_kib for p in in_window)
    var = sum((p.at - tm) ** 2 for p in in_window)
    slope = sum((p.at - tm) * (p.rss_kib - rm) for p in in_window) / var if var else 0.0
    # Anything else that ran on the gateway's core or the others during the window (another
    # process disturbing the measurement shows here).
    core_busy = {c: (p1.cores[c] - p0.cores[c]) / wall for c in p1.cores}
    gw_core_other = sum(core_busy[c] for c in gw_cores) - gw_cpu
    others = sum(core_busy.values()) - gw_cpu - load_cpu
    # Metrics over the window: from the first scrape begun in it to the last one answered in
    # it (a gateway that takes seconds to answer stretches this; metrics_response_ms says so).
    # Fewer than two answers to scrapes begun in the window: no metrics for it (None).
    begun = [s for s in scrapes if s.at - s.took >= start - 0.5]
    answered = [s for s in begun if s.at <= end + 0.5]
    m0 = m1 = None
    if len(begun) >= 2:
        m0 = begun[0]
        m1 = answered[-1] if len(answered) >= 2 else begun[-1]
    delay, from_first, frames_rate = [], [], None
    segments = []
    if m0 is not None and m1 is not None:
        delay = histogram_delta(m0, m1, "callgate_stt_send_delay_seconds")
        from_first = histogram_delta(m0, m1, "bench_stt_send_delay_from_first_seconds")
        frames = m1.value("callgate_media_frames_total") - m0.value("callgate_media_frames_total")
        frames_rate = round(frames / (m1.at - m0.at) / n, 2)
        seg_scrapes = [m0]
        for s in [x for x in begun if m0.at < x.at <= m1.at]:
            if s.at - seg_scrapes[-1].at >= (end - start) / 4 - 0.5 or s is m1:
                seg_scrapes.append(s)
        for a, b in zip(seg_scrapes, seg_scrapes[1:], strict=False):
            seg = histogram_delta(a, b, "callgate_stt_send_delay_seconds")
            cpu = [p for p in procs if a.at - 0.6 <= p.at <= b.at + 0.6]
            seg_frames = b.value("callgate_media_frames_total") - a.value(
                "callgate_media_frames_total"
            )
            segments.append(
                {
                    "t_s": round(b.at - go, 1),
                    "p99_ms": ms(quantile(seg, 0.99)),
                    "frames_per_call_s": round(seg_frames / (b.at - a.at) / n, 1),
                    "active": int(b.value("callgate_calls_active")),
                    "gw_cpu_percent": round(
                        100 * (cpu[-1].gw_cpu - cpu[0].gw_cpu) / (cpu[-1].at - cpu[0].at), 1
                    )
                    if len(cpu) >= 2
                    else None,
                }
            )
    timeline = [
        {
            "t_s": round(b.at - go, 1),
            "gw_cpu_percent": round(100 * (b.gw_cpu - a.gw_cpu) / (b.at - a.at), 1),
            "load_cpu_percent": round(100 * (b.load_cpu - a.load_cpu) / (b.at - a.at), 1),
            "rss_mib": round(b.rss_kib / 1024, 1),
        }
        for a, b in zip(procs, procs[1:], strict=False)
    ]
    up = [s.at - go for s in scrapes if s.value("callgate_calls_active") >= n]
    # Every scrape that overlapped the window, however long it took to be answered.
    took = sorted(s.took for s in scrapes if s.at >= start and s.at - s.took <= end)

    def delta(name: str) -> float:
        return final.value(name) - baseline.value(name)

    def labelled(name: str, key: str) -> dict[str, int]:
        before = baseline.series(name)
        out: dict[str, int] = {}
        for lab, v in final.series(name).items():
            d = int(v - before.get(lab, 0.0))
            if d:
                label = dict(lab).get(key, "?")
                out[label] = out.get(label, 0) + d
        return out

    per_session_turns = sum(1 for t in script_turns if t[-1][2] <= sim["audio_s"] * 1000)
    return {
        "calls": n,
        "ramp_s": ramp_s,
        "window_s": round(wall, 1),
        "all_active_after_s": round(up[0], 1) if up else None,
        "active_at_window_start": None if m0 is None else int(m0.value("callgate_calls_active")),
        "active_at_window_end": None if m1 is None else int(m1.value("callgate_calls_active")),
        "metrics_answered_in_window": m0 is not None,
        "gateway_cpu_percent_of_core": round(100 * gw_cpu, 1),
        "cpu_percent_of_core_per_call": round(100 * gw_cpu / n, 3),
        "cpu_ms_per_call_second": round(1000 * gw_cpu / n, 3),
        "load_cores_cpu_percent": round(100 * load_cpu, 1),
        "rss_baseline_mib": round(base_proc.rss_kib / 1024, 1),
        "rss_steady_mib": round(steady_rss / 1024, 1),
        "memory_per_call_kib": round((steady_rss - base_proc.rss_kib) / n, 1),
        "memory_growth_kib_per_call_minute": round(60 * slope / n, 1),
        "other_cpu_on_gateway_core_percent": round(100 * gw_core_other, 1),
        "other_processes_cpu_percent": round(100 * others, 1),
        "chunks": int(delay[-1][1]) if delay else 0,
        "send_delay_ms_p50": ms(quantile(delay, 0.50)),
        "send_delay_ms_p99": ms(quantile(delay, 0.99)),
        "send_delay_ms_p999": ms(quantile(delay, 0.999)),
        "from_first_frame_ms_p50": ms(quantile(from_first, 0.50)),
        "from_first_frame_ms_p99": ms(quantile(from_first, 0.99)),
        "frames_per_call_s": frames_rate,
        "frames_per_call_s_expected": FRAMES_PER_CALL_S,
        "metrics_response_ms_median": round(1000 * statistics.median(took), 1) if took else None,
        "metrics_response_ms_max": round(1000 * took[-1], 1) if took else None,
        "metrics_response_ms_max_whole_run": round(1000 * max(s.took for s in scrapes), 1)
        if scrapes
        else None,
        "segments": segments,
        "timeline": timeline,
        "simulator": sim,
        "calls_finished": labelled("callgate_calls_ended_total", "outcome"),
        "finals": int(delta("callgate_turn_finals_total")),
        "finals_expected": n * 2 * per_session_turns,
        "transcripts_written": labelled("callgate_transcripts_written_total", "result"),
        "stream_errors": labelled("callgate_stream_errors_total", "reason"),
        "streams_rejected": labelled("callgate_streams_rejected_total", "reason"),
        "stt_channel_failures": int(delta("callgate_stt_failures_total")),
        "stt_reconnects": int(delta("callgate_stt_reconnects_total")),
        **extra,
    }


# -- report --------------------------------------------------------------------------------------


def verdict(r: dict[str, Any]) -> list[str]:
    """Why this run fell behind real time or lost something (empty: it kept up)."""
    problems = []
    if not r["metrics_answered_in_window"]:
        problems.append(
            "the gateway answered no /metrics request during the window (its event loop was "
            f"up to {r['metrics_response_ms_max_whole_run']} ms behind)"
        )
    elif r["frames_per_call_s"] < 0.97 * FRAMES_PER_CALL_S:
        problems.append(f"gateway got {r['frames_per_call_s']} frames/call/s (not real time)")
    if r["metrics_answered_in_window"] and (
        min(r["active_at_window_start"], r["active_at_window_end"]) < r["calls"]
    ):
        problems.append(
            f"not all calls active in the window ({r['active_at_window_start']} at its start, "
            f"{r['active_at_window_end']} at its end)"
        )
    segs = [s["p99_ms"] for s in r["segments"] if s["p99_ms"] is not None]
    if len(segs) >= 2 and segs[-1] > max(20.0, 3 * segs[0]):
        problems.append(f"send delay grew across the window ({segs[0]} -> {segs[-1]} ms p99)")
    if r["gateway_cpu_percent_of_core"] > 90:
        problems.append("gateway core saturated")
    sim = r["simulator"]
    if sim["completed"] < r["calls"]:
        problems.append(f"{r['calls'] - sim['completed']} calls did not complete")
    if sim["overrun_s_max"] > 2.0:
        problems.append(f"callers ran {sim['overrun_s_max']} s over the audio's duration")
    for key in ("stream_errors", "streams_rejected"):
        if r[key]:
            problems.append(f"{key}: {r[key]}")
    if (r["metrics_response_ms_max"] or 0) > 1000:
        problems.append(f"the gateway took {r['metrics_response_ms_max']} ms to answer /metrics")
    if r["other_cpu_on_gateway_core_percent"] > 5:
        problems.append(
            f"DISTURBED: other work took {r['other_cpu_on_gateway_core_percent']}% of the "
            "gateway's core"
        )
    if r["stt_reconnects"]:
        problems.append(f"{r['stt_reconnects']} STT reconnects")
    if r["stt_channel_failures"]:
        problems.append(f"{r['stt_channel_failures']} STT channels failed")
    return problems


def table(results: list[dict[str, Any]]) -> str:
    def delay(value: float | None) -> str:
        if value is None:
            return "-"
        return f">{DELAY_TOP_MS:.0f}" if value >= DELAY_TOP_MS else f"{value:.1f}"

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    head = (
        f"{'calls':>5} {'gw CPU':>7} {'CPU/call':>9} {'KiB/call':>8} {'+KiB/min':>8} "
        f"{'peak MiB':>8} {'p50 ms':>7} {'p99 ms':>7} {'1st p99':>7} {'fr/c/s':>6} "
        f"{'done':>9} {'finals':>13} {'load':>5}  verdict"
    )
    lines = [head]
    for r in results:
        sim = r["simulator"]
        lines.append(
            f"{r['calls']:>5} {r['gateway_cpu_percent_of_core']:>6.1f}% "
            f"{r['cpu_percent_of_core_per_call']:>8.3f}% {r['memory_per_call_kib']:>8.0f} "
            f"{r['memory_growth_kib_per_call_minute']:>8.0f} {r['rss_peak_mib']:>8.0f} "
            f"{delay(r['send_delay_ms_p50']):>7} {delay(r['send_delay_ms_p99']):>7} "
            f"{delay(r['from_first_frame_ms_p99']):>7} {num(r['frames_per_call_s'], '.1f'):>6} "
            f"{sim['completed']:>4}/{r['calls']:<4} {r['finals']:>6}/{r['finals_expected']:<6} "
            f"{r['load_cores_cpu_percent']:>4.0f}%  "
            + ("real time" if not r["problems"] else "BEHIND/PROBLEMS (see JSON)")
        )
    lines.append(
        "gw CPU: the gateway's utime+stime over the window, % of its one core; CPU/call: that / "
        "calls. KiB/call: (window median RSS - RSS after warm-up) / calls; +KiB/min: RSS growth "
        "per call per minute of call; peak: VmHWM. p50/p99: delay from a chunk's last frame to "
        "the STT socket, interpolated in the gateway's histogram buckets (1st p99: from its "
        "first frame, with --first-frame-delay). fr/c/s: frames the gateway handled per call "
        f"per second (real time: {FRAMES_PER_CALL_S}). load: peer + callers + this script, % of "
        "a core."
    )
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_simulate":
        p = argparse.ArgumentParser()
        p.add_argument("_role")
        p.add_argument("--url", required=True)
        p.add_argument("--calls", type=int, required=True)
        p.add_argument("--audio", required=True)
        p.add_argument("--audio-seconds", type=float, required=True)
        p.add_argument("--ramp", type=float, required=True)
        from gateway.observability.logging import configure_logging

        configure_logging("warning")
        asyncio.run(_simulate(p.parse_args()))
        return 0

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--calls", default="50,200,500", help="comma-separated N (default: %(default)s)"
    )
    parser.add_argument("--seconds", type=float, default=30, help="steady-state window (s)")
    parser.add_argument(
        "--ramp",
        type=float,
        help="call starts spread over this many seconds (default: max(5, N / 25))",
    )
    parser.add_argument("--settle", type=float, default=3, help="wait after all calls are up (s)")
    parser.add_argument("--tail", type=float, default=8, help="audio beyond the window (s)")
    parser.add_argument("--audio", type=Path, default=ROOT / "samples" / "diane_sheila.wav")
    parser.add_argument("--gateway-core", type=int, default=0)
    parser.add_argument(
        "--load-cores", help="cores for the peer and callers (default: all but the gateway's)"
    )
    parser.add_argument(
        "--first-frame-delay",
        action="store_true",
        help="also record the delay from a chunk's first frame (adds a histogram in the gateway)",
    )
    add_profile_option(parser)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    counts = [int(c) for c in args.calls.split(",") if c.strip()]
    available = os.sched_getaffinity(0)
    gw_cores = {args.gateway_core}
    if args.load_cores:
        load_cores = {int(c) for c in args.load_cores.split(",")}
    else:
        load_cores = (available - gw_cores) or available
    if not gw_cores <= available:
        parser.error(f"--gateway-core {args.gateway_core} is not available ({sorted(available)})")
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    nofile = raise_nofile()
    need = 3 * max(counts) + 100
    if nofile < need:
        print(f"warning: RLIMIT_NOFILE {nofile} < {need} sockets needed", file=sys.stderr)
    os.sched_setaffinity(0, load_cores)  # this script's own sampling stays off the gateway's core

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # run_one's cleanup stops the children

    signal.signal(signal.SIGTERM, on_term)
    results = []
    for n in counts:
        print(
            f"N={n}: {args.seconds:.0f} s window, loadavg before {loadavg()} ...",
            file=sys.stderr,
            flush=True,
        )
        try:
            r = run_one(n, args, gw_cores, load_cores)
        except KeyboardInterrupt:
            print("interrupted (every child process stopped)", file=sys.stderr)
            return 130
        except (RuntimeError, OSError) as exc:
            print(f"  N={n} failed: {exc}", file=sys.stderr, flush=True)
            results.append({"calls": n, "failed": str(exc)})
            continue
        r["problems"] = verdict(r)
        results.append(r)
        print(
            f"  gateway {r['gateway_cpu_percent_of_core']}% of a core, "
            f"{r['memory_per_call_kib']} KiB/call, p99 {r['send_delay_ms_p99']} ms, "
            f"{r['frames_per_call_s']} frames/call/s, loadavg {r['loadavg_at_window_end']}"
            + (f"; PROBLEMS: {'; '.join(r['problems'])}" if r["problems"] else ""),
            file=sys.stderr,
            flush=True,
        )
    report = {
        "gateway_core": sorted(gw_cores),
        "load_cores": sorted(load_cores),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "first_frame_delay": args.first_frame_delay,
        "results": results,
    }
    if args.json is None:
        print(json.dumps(report, indent=2))
    print(table([r for r in results if "failed" not in r]))
    for r in results:
        if "failed" in r:
            print(f"N={r['calls']}: FAILED: {r['failed']}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
