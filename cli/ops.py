"""How `pool status` and `pool health` look on a terminal (the JSON is the control reply)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Column, Table

from pool.config import settings_line
from pool.cpus import CorePlan, core_list_text

STATUS_STYLE = {"healthy": "green", "degraded": "yellow", "failed": "red"}
MIB = 1024 * 1024
TABLE_WIDTH = 140


def print_status(out: Console, st: dict[str, Any]) -> None:
    canary = st.get("canary")
    out.print(f"[bold]zeropool[/] pid {st['pid']} on {st['endpoint']}, {st['state']}, "
              f"up {duration(st['uptime_s'])}; active [bold]{st['active']}[/]"
              + (f", canary {canary['version']} {canary['share']:.0%}" if canary else ""))
    req = st["requests"]
    errors = ", ".join(f"{k} {n}" for k, n in sorted(req["errors_by_code"].items()))
    latency = st.get("latency_ms")
    out.print(f"{st.get('requests_per_s', 0):.1f} requests/s"
              + (f", p50 {latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms" if latency else "")
              + " (last 10 s); queue "
              f"{st['queue_depth']}, in flight {st['inflight']}; since start: ok {req['ok']}, "
              f"errors {req['errors']}" + (f" ({errors})" if errors else "")
              + f", dropped {req['dropped']}")
    print_rotation(out, st.get("rotation"))
    for trouble in version_troubles(st):
        out.print(f"[red]{trouble}[/]")
    if st.get("system"):
        out.print(system_line(st["system"]))
    if st.get("settings"):
        out.print(f"limits: {settings_line(st['settings'])}")
        affinity = st["settings"].get("cpu_affinity")
        if affinity:
            out.print(f"CPU affinity: {affinity_text(affinity)}")
    remote = st.get("remote_control")
    if remote:
        out.print(f"remote control {remote['endpoint']} (CurveZMQ, operator keys): "
                  f"{remote['refused_handshakes']} handshake(s) refused"
                  + (f", last from {remote['last_refused_from']}"
                     if remote["last_refused_from"] else ""))
    if st.get("metrics_url"):
        out.print(f"metrics {st['metrics_url']}; log {st.get('log_file')}")
    for line in version_threshold_lines(st):
        out.print(line)
    # Worker ids are in --json; the pid names a worker for an operator.
    table = Table("pid", "version", "device", Column("runs", no_wrap=True), "state",
                  "in flight", "busy", "served", "errors", "restarts", "heartbeat", "RSS MiB",
                  "GPU MiB", box=box.SIMPLE_HEAD)
    for w in st["workers"]:
        beat = "-" if w["last_heartbeat_s"] is None else f"{w['last_heartbeat_s']:.1f}s"
        gpu = w.get("gpu_memory_bytes") or 0
        prompt = f"prompt {w['prompt']}" if w.get("prompt") else None
        runs = " ".join(x for x in (w["dtype"], w["graph"], w.get("pooling"), prompt)
                        if x and x != "none") or "-"
        busy = (w.get("batching") or {}).get("busy_percent")
        table.add_row(str(w["pid"]), w["version"], device_cell(w), runs, w["state"],
                      str(w["inflight"]), "-" if busy is None else f"{busy:.0f}%",
                      str(w["served"]), str(w["errors"]),
                      str(w["restarts"]), beat, f"{w['rss_bytes'] / MIB:.0f}",
                      f"{gpu / MIB:.0f}" if gpu else "-")
    # Rich squeezes tables into 80 columns when stdout is not a terminal: don't.
    Console(file=out.file, width=max(out.width, TABLE_WIDTH),
            force_terminal=out.is_terminal).print(table)


def affinity_text(plan: dict[str, Any]) -> str:
    """--cpu-affinity's plan as status JSON has it, as CorePlan.describe() says it."""
    return CorePlan(tuple(plan["serving"]), tuple(map(tuple, plan["passes"]))).describe()


def device_cell(worker: dict[str, Any]) -> str:
    """"cpu", or "cpu 2-3" where --cpu-affinity gives its passes cores of their own."""
    cores = worker.get("passes_cores")
    return f"{worker['device']} {core_list_text(cores)}" if cores else worker["device"]


def thresholds_cell(row: dict[str, Any]) -> str:
    """A version's verdict thresholds and their source: "0.92 / 0.86 (builtin)"."""
    cuts = row.get("thresholds")
    if not isinstance(cuts, list) or len(cuts) != 2:
        return "-"
    return f"{cuts_text(cuts)} ({row.get('thresholds_source', '?')})"


def version_threshold_lines(st: dict[str, Any]) -> list[str]:
    """Per loaded version, the thresholds its workers' verdicts use."""
    return [f"{name}: verdict thresholds {thresholds_cell(v)}"
            for name, v in (st.get("versions") or {}).items() if v.get("thresholds")]


def print_calibration(out: Console, doc: dict[str, Any]) -> None:
    """`pool calibrate`'s report (the document of tooling.calibrate.calibration_document)."""
    counts = doc["label_counts"]
    out.print(f"[bold]{doc['version']}[/] on {doc['pairs']} pairs from {doc['pairs_file']} "
              f"({counts['2']} same meaning, {counts['1']} same topic, {counts['0']} unrelated)")
    out.print(f"  Spearman                         {figure(doc['spearman'])}")
    out.print(f"  AUC (same meaning vs unrelated)  {figure(doc['auc'])}")
    out.print(f"  verdict accuracy at current      {doc['accuracy']:.3f}  "
              f"(thresholds {cuts_text(doc['thresholds'])})")
    out.print(f"  verdict accuracy at fitted       {doc['fitted_accuracy']:.3f}  "
              f"(thresholds {cuts_text(doc['fitted_thresholds'])}; fitted on these pairs, "
              "so optimistic)")
    saved = doc.get("saved")
    if saved is None:
        out.print(f"fitted thresholds: {cuts_text(doc['fitted_thresholds'])} "
                  f"(store them with --save, or --thresholds "
                  f"{doc['fitted_thresholds'][0]},{doc['fitted_thresholds'][1]})")
        return
    out.print(f"[green]saved[/]: {doc['version']} now has thresholds "
              f"{cuts_text(saved['thresholds'])}.")
    in_use = saved.get("in_use")
    if in_use is not None and in_use.get("thresholds") != saved["thresholds"]:
        out.print(f"Its workers already running keep {thresholds_cell(in_use)} until the "
                  "version is next loaded (a rotation to it, or a restart of the pool).")


def cuts_text(cuts: list[float]) -> str:
    return f"{cuts[0]:.4g} / {cuts[1]:.4g}"


def figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def version_troubles(st: dict[str, Any]) -> list[str]:
    """One line per version that cannot serve or keeps crashing, from a status reply."""
    lines = []
    for name, v in (st.get("versions") or {}).items():
        trouble = v.get("failed") or v.get("crash_loop")
        if trouble:
            retry = v.get("next_try_s")
            lines.append(f"{name}: {trouble}"
                         + (f" (next try in {retry:.0f}s)" if retry is not None else ""))
    return lines


def print_rotation(out: Console, rot: dict[str, Any] | None) -> None:
    if not rot:
        out.print("no rotation since start")
        return
    state = rot["outcome"] or rot["phase"]
    timings = ", ".join(f"{phase} {seconds:.2f}s" for phase, seconds in rot["timings"].items())
    out.print(f"last rotation {rot['id']}: {rot['source']} -> {rot['target']} "
              f"({rot['strategy']}) [bold]{state}[/]"
              + (f", reason: {rot['reason']}" if rot["reason"] else "")
              + (f"; {timings}" if timings else ""))


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"  # None: a GPU that does not say (MIG)


def _usable(system: dict[str, Any]) -> str:
    """", 4 usable (a CPU limit of 3.5)" where the pool may use fewer than the machine's."""
    usable, limit = system.get("cpus_usable"), system.get("cpu_limit")
    if usable is None or usable >= system["cpu_count"]:
        return ""
    return f" ({usable} usable" + (f", a CPU limit of {limit:g})" if limit else ")")


def system_line(system: dict[str, Any]) -> str:
    line = (f"machine: CPU {system['cpu_percent']:.0f}% of {system['cpu_count']} cores"
            f"{_usable(system)}, "
            f"memory {system['memory_percent']:.0f}% "
            f"({system['memory_used_bytes'] / MIB:,.0f} of "
            f"{system['memory_total_bytes'] / MIB:,.0f} MiB)")
    gpus = [f"GPU {g['index']} {g['name']}: load {_percent(g['load_percent'])}, "
            f"{g['memory_used_bytes'] / MIB:,.0f} of {g['memory_total_bytes'] / MIB:,.0f} MiB"
            for g in system["gpus"]]
    return "; ".join([line, *gpus]) if gpus else f"{line}; no GPU ({system['gpu_error']})"


def print_health(out: Console, report: dict[str, Any]) -> None:
    status = report["status"]
    out.print(f"[bold {STATUS_STYLE[status]}]{status}[/] (active {report['active']})")
    for reason in report["pool"]["reasons"]:
        out.print(f"  - {reason}")
    table = Table("version", "health", "workers", "replies/min", "errors", "golden check",
                  "reasons")
    for name, v in report["versions"].items():
        golden = v.get("golden")
        check = "-" if golden is None else "passed" if golden["ok"] else "[red]failed[/]"
        table.add_row(name, f"[{STATUS_STYLE[v['status']]}]{v['status']}[/]",
                      f"{v['workers_ready']}/{v['workers_wanted']}",
                      str(v["replies_last_minute"]), f"{v['error_rate']:.1%}", check,
                      "; ".join(v["reasons"]) or "-")
    out.print(table)
    out.print(system_line(report["system"]))


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def quality_line(quality: dict) -> str:
    """The quality gate's figures as one line."""
    verdict_word = "[green]passed[/]" if quality["passed"] else "[red]failed[/]"

    def figure(value: float | None) -> str:
        return "undefined" if value is None else f"{value:.3f}"

    remembered = " (from its own gate)" if quality.get("active_from") == "history" else ""
    active = ("" if quality["active_spearman"] is None
              else f", active version {figure(quality['active_spearman'])}{remembered}")
    return (f"  quality gate {verdict_word}: Spearman {figure(quality['spearman'])}{active} "
            f"on {quality['eval']} ({quality['pairs']} pairs; floor "
            f"{quality['min_spearman']:g}, drop {quality['max_spearman_drop']:g})")
