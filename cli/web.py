"""The web console that `pool ui` serves: the seed's Streamlit page, in production form.

The page is a client of a running pool and nothing more: similarity goes through
router.client.Client (the frontend endpoint, $ZEROPOOL_ENDPOINT), operations and status through
the control socket (pool.control.control_request: $ZEROPOOL_STATE_DIR's pool, or $ZEROPOOL_POOL's
over CurveZMQ with $ZEROPOOL_SERVER_KEY / $ZEROPOOL_CLIENT_KEY). It never loads a model.
A pool that is down or refuses a command shows as an error on the page, never as a traceback.

Run it with `pool ui` (or `streamlit run cli/web.py`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st
import zmq

from cli.ops import thresholds_cell, version_troubles
from pool.config import default_state_dir
from pool.control import POOL_ENV, ControlError, ControlTarget, PoolNotRunning, control_request
from router.client import Client, NoReply, ZeroPoolError
from router.keys import ClientKeys, KeyFileError
from router.protocol import DEFAULT_ENDPOINT, ENDPOINT_ENV

DEFAULT_A = "今天天气真好"
DEFAULT_B = "今日阳光明媚"
ACTIVE = "active"  # the version pin meaning "whatever the pool routes to"
REQUEST_TIMEOUT_S = 10.0
CONTROL_TIMEOUT_S = 5.0
REFRESH_S = 2.0
HISTORY = 150  # chart samples kept per session (5 minutes at one per REFRESH_S)
FLASH_S = 60.0  # how long the outcome of an operation stays in the sidebar
STRATEGIES = ["auto", "surge", "rolling"]
MIB = 1024 * 1024


# -- talking to the pool --------------------------------------------------------------------


def pool_address() -> tuple[str, ControlTarget]:
    """The frontend endpoint and where operations go, as `pool ui` passed them in the
    environment. KeyFileError or ValueError if the remote pool's keys are missing or bad."""
    endpoint = os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
    remote = os.environ.get(POOL_ENV)
    if not remote:
        return endpoint, ControlTarget.local(default_state_dir())
    keys = ClientKeys.from_env()
    if keys is None:
        raise KeyFileError(f"{POOL_ENV} needs ZEROPOOL_SERVER_KEY and ZEROPOOL_CLIENT_KEY")
    return endpoint, ControlTarget.remote(remote, keys)


def call_control(target: ControlTarget, cmd: str, **args: Any) -> tuple[dict[str, Any] | None, str]:
    """One control command: (reply, "") or (None, a message for the page)."""
    try:
        return control_request(target, cmd, timeout_s=CONTROL_TIMEOUT_S, **args), ""
    except PoolNotRunning as exc:
        return None, f"The pool is not running: {exc}"
    except (ControlError, zmq.ZMQError, OSError) as exc:
        return None, f"`{cmd}` failed: {exc}"


def missing_socket(endpoint: str) -> str:
    """For an ipc:// endpoint whose socket file is absent, why no request can succeed."""
    if endpoint.startswith("ipc://") and not Path(endpoint[len("ipc://"):]).exists():
        return (f"No pool listens on {endpoint} (no socket file); start one with "
                f"`pool serve --bind {endpoint}`")
    return ""


def score_pair(endpoint: str, text_a: str, text_b: str, version: str | None) -> dict[str, Any]:
    """One similarity request; the outcome as a dict the page keeps in session state."""
    problem = missing_socket(endpoint)
    if problem:
        return {"error": problem}
    started = time.perf_counter()
    try:
        keys = ClientKeys.from_env()  # a Curve pool: `pool ui --server-key --client-key`
        with Client(endpoint, timeout=REQUEST_TIMEOUT_S, curve=keys) as client:
            result = client.similarity([(text_a, text_b)], version=version)
    except NoReply:
        return {"error": f"No reply from {endpoint} within {REQUEST_TIMEOUT_S:.0f}s: is the "
                         "pool running? (`pool serve`, `pool status`)"}
    except ZeroPoolError as exc:
        return {"error": f"The pool refused the request ({exc.code}): {exc.message}"}
    except (zmq.ZMQError, OSError) as exc:
        return {"error": f"Cannot reach {endpoint}: {exc}"}
    except KeyFileError as exc:
        return {"error": f"Curve keys: {exc}"}
    latency_ms = (time.perf_counter() - started) * 1000
    # The verdict by the answering version's thresholds (the seed's from an older pool).
    return {"score": result.scores[0], "verdict": result.verdict(0), "version": result.version,
            "thresholds": list(result.thresholds), "latency_ms": latency_ms}


# -- session state --------------------------------------------------------------------------


def init_state() -> None:
    for key, value in (("rates", []), ("latencies", []), ("result", None), ("flash", None),
                       ("shape", None)):
        st.session_state.setdefault(key, value)


def append_sample(key: str, sample: tuple[Any, ...]) -> None:
    samples = st.session_state.setdefault(key, [])
    samples.append(sample)
    del samples[:-HISTORY]


# -- the sidebar: versions and operations ---------------------------------------------------


def act(target: ControlTarget, cmd: str, done: Callable[[dict[str, Any]], str],
        **args: Any) -> None:
    """Run an operator command, keep its outcome for the next run, and rerun the page."""
    reply, error = call_control(target, cmd, **args)
    flash(*(("error", error) if reply is None else ("success", done(reply))))
    st.rerun()


def rotation_started(reply: dict[str, Any]) -> str:
    rot = reply.get("rotation") or {}
    verb = "aborting rotation" if reply.get("kind") == "abort" else "rotation"
    return (f"{verb} {rot.get('id')} to {rot.get('target')} started "
            f"({rot.get('strategy')}); the live panel follows it")


def flash(kind: str, message: str) -> None:
    st.session_state.flash = (kind, message, time.monotonic())


def show_flash() -> None:
    kept = st.session_state.get("flash")
    if kept and time.monotonic() - kept[2] < FLASH_S:
        (st.error if kept[0] == "error" else st.success)(kept[1])


def shape(status: dict[str, Any] | None) -> tuple[Any, ...] | None:
    """What the sidebar shows of the pool: when the live panel sees it change, the whole page
    reruns, so the sidebar's choices follow rotations made here or elsewhere."""
    if status is None:
        return None
    return (status.get("active"), (status.get("canary") or {}).get("version"),
            tuple(sorted(status.get("versions") or {})))


def pool_summary(status: dict[str, Any] | None, registered: list[dict[str, Any]]) -> None:
    if status is None:
        return
    canary = status.get("canary")
    st.info(f"Active version: **{status.get('active')}**"
            + (f" · canary {canary.get('version')} {canary.get('share', 0):.0%}"
               if canary else ""))
    st.caption(f"Loaded: {', '.join(sorted(status.get('versions') or {})) or '—'}")
    st.caption(f"Registered: {', '.join(v['version'] for v in registered) or '—'}")
    for v in registered:  # each version's verdict thresholds, and where they come from
        st.caption(f"{v['version']}: verdict thresholds {thresholds_cell(v)}")


def add_version_form(target: ControlTarget) -> None:
    with st.form("add_version", clear_on_submit=False):
        st.markdown("**Add a version**")
        path = st.text_input("Model path", key="add_path",
                             placeholder="/models/structbert-v2")
        tag = st.text_input("Version tag", value="v2", key="add_version")
        if st.form_submit_button("Add version"):
            if not path.strip() or not tag.strip():
                flash("error", "Give a model path and a version tag.")
                st.rerun()
            act(target, "versions_add", lambda _: f"registered {tag.strip()}",
                version=tag.strip(), path=path.strip())


def choose(label: str, options: list[str], key: str, **kwargs: Any) -> str | None:
    """A select box that falls back to its first option when its choice has gone away
    (a version unloaded or rotated away from), instead of showing no choice at all."""
    if st.session_state.get(key) not in options:
        st.session_state[key] = options[0] if options else None
    return st.selectbox(label, options, key=key, **kwargs)


def rotate_form(target: ControlTarget, registered: list[str],
                status: dict[str, Any] | None) -> None:
    active = (status or {}).get("active")
    with st.form("rotate_form"):
        st.markdown("**Rotate**")
        version = choose("To version", [v for v in registered if v != active],
                         "rotate_version")
        strategy = st.selectbox("Strategy", STRATEGIES, key="rotate_strategy")
        canary = st.number_input("Canary % (0: switch all traffic)", 0.0, 100.0, 0.0,
                                 step=5.0, format="%.0f", key="rotate_canary")
        if st.form_submit_button("Rotate") and version:
            act(target, "rotate", rotation_started, version=version, strategy=strategy,
                canary=canary or None)


def canary_buttons(target: ControlTarget, status: dict[str, Any] | None) -> None:
    left, right = st.columns(2)
    if left.button("Promote", key="promote", disabled=not (status or {}).get("canary"),
                   help="Finish the canary: all unpinned traffic to the new version"):
        act(target, "promote", lambda r: f"promoting {r['rotation']['target']}")
    if right.button("Roll back", key="rollback",
                    help="Abort the rotation or canary, else rotate back to the previous one"):
        act(target, "rollback", rotation_started)


def load_unload(target: ControlTarget, registered: list[str],
                status: dict[str, Any] | None) -> None:
    loaded = sorted((status or {}).get("versions") or {})
    active = (status or {}).get("active")
    st.markdown("**Load / unload**")
    to_load = choose("Load", [v for v in registered if v not in loaded], "load_version")
    if st.button("Load", key="load", disabled=to_load is None):
        act(target, "load", lambda _: f"loading {to_load}; its workers show below when "
                                         "ready", version=to_load)
    to_unload = choose("Unload", [v for v in loaded if v != active], "unload_version")
    if st.button("Unload", key="unload", disabled=to_unload is None):
        act(target, "unload", lambda _: f"unloading {to_unload}", version=to_unload)


def sidebar(target: ControlTarget) -> dict[str, Any] | None:
    """Operations on the pool; returns its status (None when it cannot be reached)."""
    st.header("Pool")
    show_flash()
    status, error = call_control(target, "status")
    st.session_state.shape = shape(status)
    listing, _ = call_control(target, "versions") if status else (None, "")
    if error:
        st.error(error)
    registered = (listing or {}).get("versions") or []
    pool_summary(status, registered)
    names = [v["version"] for v in registered]
    add_version_form(target)
    rotate_form(target, names, status)
    canary_buttons(target, status)
    load_unload(target, names, status)
    return status


# -- the similarity form --------------------------------------------------------------------


def similarity_form(endpoint: str, loaded: list[str]) -> None:
    with st.form("similarity"):
        text_a = st.text_area("Sentence A", DEFAULT_A, key="text_a")
        text_b = st.text_area("Sentence B", DEFAULT_B, key="text_b")
        pin = choose("Version", [ACTIVE, *loaded], "pin",
                     help="`active`: the version the pool routes to (canary included)")
        if st.form_submit_button("Compute similarity", type="primary"):
            st.session_state.result = score_pair(endpoint, text_a, text_b,
                                                 None if pin == ACTIVE else pin)
    show_result(st.session_state.get("result"))


def show_result(result: dict[str, Any] | None) -> None:
    if not result:
        return
    if "error" in result:
        st.error(result["error"])
        return
    score = result["score"]
    show = {"very similar": st.success, "related": st.warning}.get(result["verdict"], st.error)
    st.metric("Similarity", f"{score:.4f}")
    show(f"Verdict: {result['verdict']}")
    st.progress(min(max(score, 0.0), 1.0))
    high, low = result.get("thresholds") or (None, None)
    cuts = f" · thresholds {high:g} / {low:g}" if high is not None else ""
    st.caption(f"version {result['version']}{cuts} · {result['latency_ms']:.1f} ms round trip")


# -- the live panel -------------------------------------------------------------------------


def status_panel(target: ControlTarget) -> None:
    status, error = call_control(target, "status")
    if status is not None and shape(status) != st.session_state.get("shape"):
        st.rerun()  # versions changed, or the pool came up: refresh the sidebar
    if status is None:
        st.error(error)
        return
    now = datetime.now()
    rate = status.get("requests_per_s")
    if rate is not None:
        append_sample("rates", (now, rate))
    latency = status.get("latency_ms")
    if latency:
        append_sample("latencies", (now, latency["p50"], latency["p99"]))
    headline(status, rate)
    for trouble in version_troubles(status):
        st.error(trouble)
    rotation_line(status.get("rotation"))
    workers_table(status.get("workers") or [])
    system_panel(status.get("system"))
    charts()
    st.caption(f"updated {datetime.now():%H:%M:%S}")


def headline(status: dict[str, Any], rate: float | None) -> None:
    canary = status.get("canary")
    requests = status.get("requests") or {}
    cols = st.columns(6)
    cols[0].metric("Active", str(status.get("active")))
    cols[1].metric("Canary", f"{canary.get('version')} {canary.get('share', 0):.0%}"
                   if canary else "—")
    cols[2].metric("Queue depth", status.get("queue_depth", "—"))
    cols[3].metric("In flight", status.get("inflight", "—"))
    cols[4].metric("Requests/s", "—" if rate is None else f"{rate:.1f}")
    cols[5].metric("OK / errors", f"{requests.get('ok', '—')} / {requests.get('errors', '—')}")


def rotation_line(rot: dict[str, Any] | None) -> None:
    if not rot:
        return
    text = (f"Rotation {rot.get('id')}: {rot.get('source')} → {rot.get('target')} "
            f"({rot.get('strategy')}), phase **{rot.get('phase')}**")
    quality = rot.get("quality")
    if quality:
        text += ("; quality gate " + ("passed" if quality["passed"] else "failed")
                 + f": Spearman {quality['spearman']} (active {quality['active_spearman']}) "
                 f"on {quality['eval']}")
    if rot.get("outcome") == "done":
        st.success(text)
    elif rot.get("outcome") is not None:
        st.warning(text + (f"; reason: {rot['reason']}" if rot.get("reason") else ""))
    else:
        st.info(text)


def workers_table(workers: list[dict[str, Any]]) -> None:
    rows = [{"pid": w.get("pid"), "version": w.get("version"), "device": w.get("device"),
             "state": w.get("state"), "inflight": w.get("inflight"), "served": w.get("served"),
             "errors": w.get("errors"), "restarts": w.get("restarts"),
             "rss MiB": round((w.get("rss_bytes") or 0) / MIB, 1)} for w in workers]
    st.dataframe(pd.DataFrame(rows), hide_index=True)


def system_panel(system: Any) -> None:
    """The pool machine (status "system", when the pool reports it): CPU, memory, GPUs."""
    if not isinstance(system, dict) or not system:
        return
    cols = st.columns(3)
    usable = system.get("cpus_usable")
    cols[0].metric("CPU", percent(system.get("cpu_percent")),
                   help=f"{system.get('cpu_count', '?')} cores"
                        + (f", {usable} usable by the pool" if usable is not None else ""))
    cols[1].metric("Memory", percent(system.get("memory_percent")),
                   help=f"{gib(system.get('memory_used_bytes'))} of "
                        f"{gib(system.get('memory_total_bytes'))} used")
    load = [x for x in system.get("load_average") or [] if isinstance(x, (int, float))]
    cols[2].metric("Load average", " / ".join(f"{x:.2f}" for x in load) or "—")
    gpus = [g for g in system.get("gpus") or [] if isinstance(g, dict)]
    if gpus:
        st.dataframe(pd.DataFrame([
            {"gpu": g.get("index"), "name": g.get("name"), "load": percent(g.get("load_percent")),
             "memory used": gib(g.get("memory_used_bytes")),
             "memory total": gib(g.get("memory_total_bytes"))} for g in gpus]), hide_index=True)
    elif system.get("gpu_error"):
        st.caption(f"GPUs: none ({system['gpu_error']})")


def percent(value: Any) -> str:
    return f"{value:.0f}%" if isinstance(value, (int, float)) else "—"


def gib(value: Any) -> str:
    return f"{value / 1024**3:.1f} GiB" if isinstance(value, (int, float)) else "?"


def charts() -> None:
    left, right = st.columns(2)
    with left:
        st.markdown("**Requests/s** (the pool, last 10 s)")
        series(st.session_state.get("rates") or [], ["requests/s"])
    with right:
        st.markdown("**Latency, ms** (the pool's replies, last 10 s)")
        series(st.session_state.get("latencies") or [], ["p50", "p99"])


def series(samples: list[tuple[Any, ...]], names: list[str]) -> None:
    if not samples:
        st.caption("no samples yet")
        return
    frame = pd.DataFrame(samples, columns=["time", *names]).set_index("time")
    st.line_chart(frame, height=200)


def live_panel(target: ControlTarget) -> None:
    st.subheader("Live status")
    live = st.toggle(f"Refresh every {REFRESH_S:.0f} s", value=True, key="live")
    st.fragment(status_panel, run_every=REFRESH_S if live else None)(target)


# -- the page -------------------------------------------------------------------------------


def main() -> None:
    st.set_page_config(page_title="zeropool", layout="wide")
    init_state()
    try:
        endpoint, target = pool_address()
    except (KeyFileError, ValueError) as exc:
        st.error(f"Cannot reach the pool's control socket: {exc}")
        return
    with st.sidebar:
        status = sidebar(target)
    st.title("zeropool · sentence similarity")
    st.caption(f"pool {endpoint} · operations through the {target}")
    similarity_form(endpoint, sorted((status or {}).get("versions") or {}))
    live_panel(target)


main()
