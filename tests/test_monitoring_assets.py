"""config/prometheus/alerts.yml and config/grafana/callgate.json against promtool and the gateway.

promtool comes from the Debian package `prometheus` (scripts/install-system-deps.sh installs it):
a missing promtool fails these tests rather than skipping them, so the checks never silently stop.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # PyYAML: a dependency of schemathesis (dev extra)

from tests.gateway_server import (
    call_messages,
    hello_engine,
    running_gateway,
    send_messages,
    settings_for,
)

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "config" / "grafana" / "callgate.json"

# Every callgate_* metric the gateway exposes (histograms by their base name, counters with the
# _total they are exposed with). The alert rules and the dashboard may use only these.
KNOWN = frozenset(
    {
        # calls
        "callgate_calls_active",
        "callgate_calls_started_total",
        "callgate_calls_ended_total",
        "callgate_call_duration_seconds",
        # streams
        "callgate_streams_total",
        "callgate_streams_rejected_total",
        "callgate_stream_errors_total",
        # audio
        "callgate_audio_received_seconds_total",
        "callgate_audio_gap_filled_seconds_total",
        "callgate_media_frames_dropped_total",
        "callgate_media_frames_total",
        "callgate_media_bytes_total",
        "callgate_siprec_packet_delay_seconds",
        "callgate_siprec_rtp_dropped_total",
        # speech to text
        "callgate_stt_sessions_active",
        "callgate_stt_session_starts_total",
        "callgate_stt_reconnects_total",
        "callgate_stt_failures_total",
        "callgate_stt_final_latency_seconds",
        "callgate_turn_partials_total",
        "callgate_turn_finals_total",
        "callgate_stt_queued_audio_seconds",
        "callgate_stt_send_delay_seconds",
        # outputs
        "callgate_events_published_total",
        "callgate_live_subscribers",
        "callgate_live_subscriber_drops_total",
        "callgate_live_partials_coalesced_total",
        "callgate_live_publish_backlog",
        "callgate_store_write_seconds",
        "callgate_store_write_failures_total",
        "callgate_webhook_deliveries_total",
        "callgate_webhook_outbox_depth",
        "callgate_transcripts_written_total",
        # process
        "callgate_event_loop_lag_seconds",
        "callgate_ready",
    }
)

# Metric names in the expressions: every metric the assets use starts with one of these prefixes,
# and no label name or PromQL function does (`up` is Prometheus's own, checked by promtool).
_NAME = re.compile(r"\b((?:callgate|process|python_gc)_[a-z0-9_]+)\b")
_SUFFIX = re.compile(r"_(?:bucket|sum|count|created)$")


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: install the Debian package `prometheus` "
            "(scripts/install-system-deps.sh does)"
        )
    return path


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    out: list[dict[str, Any]] = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _exprs() -> list[str]:
    """Every PromQL expression: alert rules, panel targets and template-variable queries."""
    exprs = [str(rule["expr"]) for rule in _rules()]
    dash = _dashboard()
    for panel in _panels(dash):
        exprs += [t["expr"] for t in panel.get("targets", [])]
    for variable in dash["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["query"]["query"])
    return exprs


def _base(name: str) -> str:
    return _SUFFIX.sub("", name)


def _used_names() -> set[str]:
    return {_base(m) for expr in _exprs() for m in _NAME.findall(expr)}


# -- alert rules ---------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_every_rule_has_severity_and_annotations() -> None:
    rules = _rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), names
    for rule in rules:
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key), (rule["alert"], key)
    exprs = {rule["alert"]: " ".join(str(rule["expr"]).split()) for rule in rules}
    # The conditions the operations runbook relies on are all covered.
    wanted = {
        'up{job="callgate"} == 0',
        "callgate_ready == 0",
        "callgate_stt_failures_total",
        "callgate_stt_final_latency_seconds_bucket",
        "callgate_stt_reconnects_total",
        "callgate_event_loop_lag_seconds_bucket",
        "callgate_webhook_outbox_depth",
        "callgate_live_publish_backlog",
        'outcome="dead"',
        "at_capacity|draining",
    }
    for fragment in wanted:
        assert any(fragment in e for e in exprs.values()), fragment


# promtool's unit tests compare annotations exactly; the annotations' templates are checked by
# `promtool check rules` above, so the unit tests run on the rules without them and pin down
# what matters for paging: expressions, `for` durations and labels.
_UNIT_TESTS: dict[str, Any] = {
    "rule_files": ["rules.yml"],
    "evaluation_interval": "1m",
    "tests": [
        {
            "name": "gateway down",
            "interval": "1m",
            "input_series": [
                # gw1 stops answering at 3 m; another job's target down is not ours.
                {"series": 'up{job="callgate", instance="gw1:8080"}', "values": "1 1 1 0x10"},
                {"series": 'up{job="callgate", instance="gw2:8080"}', "values": "1x13"},
                {"series": 'up{job="node", instance="gw1:9100"}', "values": "0x13"},
            ],
            "alert_rule_test": [
                # Down for 1 m: pending, not firing (for: 2m).
                {"eval_time": "4m", "alertname": "CallgateDown", "exp_alerts": []},
                {
                    "eval_time": "6m",
                    "alertname": "CallgateDown",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "critical",
                                "job": "callgate",
                                "instance": "gw1:8080",
                            }
                        }
                    ],
                },
            ],
        },
        {
            "name": "webhook outbox backlog",
            "interval": "1m",
            "input_series": [
                {
                    "series": 'callgate_webhook_outbox_depth{job="callgate", instance="gw1:8080"}',
                    "values": "150x30",
                },
                {
                    "series": 'callgate_webhook_outbox_depth{job="callgate", instance="gw2:8080"}',
                    "values": "40x30",
                },
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "CallgateWebhookBacklog", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "CallgateWebhookBacklog",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "job": "callgate",
                                "instance": "gw1:8080",
                            }
                        }
                    ],
                },
            ],
        },
        {
            "name": "store stalled",
            "interval": "1m",
            "input_series": [
                # gw1's store hangs at 2 m; gw2 has a short burst, drained within a minute.
                {
                    "series": 'callgate_live_publish_backlog{job="callgate", instance="gw1:8080"}',
                    "values": "0 0 80x10",
                },
                {
                    "series": 'callgate_live_publish_backlog{job="callgate", instance="gw2:8080"}',
                    "values": "0 0 400 0x10",
                },
            ],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "CallgateStoreStalled", "exp_alerts": []},
                {
                    "eval_time": "5m",
                    "alertname": "CallgateStoreStalled",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "critical",
                                "job": "callgate",
                                "instance": "gw1:8080",
                            }
                        }
                    ],
                },
            ],
        },
        {
            "name": "STT final latency p95",
            "interval": "1m",
            "input_series": [
                # gw1: 20 finals a minute, 17 of them between 2.5 and 5 s: p95 about 4.9 s.
                *[
                    {
                        "series": "callgate_stt_final_latency_seconds_bucket"
                        f'{{instance="gw1:8080", engine="assemblyai", le="{le}"}}',
                        "values": f"0+{per_min}x40",
                    }
                    for le, per_min in (("0.5", 1), ("1", 2), ("2.5", 3), ("5", 20), ("+Inf", 20))
                ],
                # gw2: every final within 0.5 s.
                *[
                    {
                        "series": "callgate_stt_final_latency_seconds_bucket"
                        f'{{instance="gw2:8080", engine="local", le="{le}"}}',
                        "values": "0+20x40",
                    }
                    for le in ("0.5", "1", "2.5", "5", "+Inf")
                ],
            ],
            "alert_rule_test": [
                {"eval_time": "8m", "alertname": "CallgateSttLatencyHigh", "exp_alerts": []},
                {
                    "eval_time": "25m",
                    "alertname": "CallgateSttLatencyHigh",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "instance": "gw1:8080",
                                "engine": "assemblyai",
                            }
                        }
                    ],
                },
            ],
        },
        {
            "name": "STT reconnects: a storm fires, a trickle does not",
            "interval": "1m",
            "input_series": [
                {  # 0.5 reconnects a second
                    "series": 'callgate_stt_reconnects_total{instance="gw1:8080", '
                    'engine="assemblyai", reason="closed"}',
                    "values": "0+30x30",
                },
                {  # 0.1 a second: below the 0.2/s threshold
                    "series": 'callgate_stt_reconnects_total{instance="gw2:8080", '
                    'engine="assemblyai", reason="closed"}',
                    "values": "0+6x30",
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "20m",
                    "alertname": "CallgateSttReconnectStorm",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "instance": "gw1:8080",
                                "engine": "assemblyai",
                            }
                        }
                    ],
                },
            ],
        },
        {
            "name": "healthy gateway: nothing fires",
            "interval": "1m",
            "input_series": [
                {"series": 'up{job="callgate", instance="gw1:8080"}', "values": "1x30"},
                {"series": 'callgate_ready{instance="gw1:8080"}', "values": "1x30"},
                {"series": 'callgate_webhook_outbox_depth{instance="gw1:8080"}', "values": "3x30"},
                {
                    "series": 'callgate_webhook_deliveries_total{instance="gw1:8080", '
                    'outcome="delivered"}',
                    "values": "0+5x30",
                },
                {
                    "series": 'callgate_webhook_deliveries_total{instance="gw1:8080", '
                    'outcome="dead"}',
                    "values": "0x30",
                },
            ],
            "alert_rule_test": [
                {"eval_time": "25m", "alertname": name, "exp_alerts": []}
                for name in (
                    "CallgateDown",
                    "CallgateNotReady",
                    "CallgateWebhookBacklog",
                    "CallgateWebhookDeadLettered",
                )
            ],
        },
        {
            "name": "dead-lettered webhook",
            "interval": "1m",
            "input_series": [
                {
                    "series": 'callgate_webhook_deliveries_total{instance="gw1:8080", '
                    'outcome="dead"}',
                    "values": "0 0 0 0 1x10",
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "7m",
                    "alertname": "CallgateWebhookDeadLettered",
                    "exp_alerts": [
                        {"exp_labels": {"severity": "critical", "instance": "gw1:8080"}}
                    ],
                },
            ],
        },
    ],
}


def test_alert_rules_fire_in_promtool_unit_tests(tmp_path: Path) -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(doc))
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(_UNIT_TESTS, sort_keys=False))
    result = subprocess.run(
        [_promtool(), "test", "rules", "tests.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


# -- dashboard -----------------------------------------------------------------------------------


def test_dashboard_is_valid_with_unique_ids_and_targets() -> None:
    dash = _dashboard()
    assert dash["uid"] == "callgate"
    assert 36 <= dash["schemaVersion"] <= 41
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["source"]["query"]["query"] == "label_values(callgate_calls_active, source)"
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    for panel in panels:
        pos = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= pos.keys(), panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Calls", "Audio", "Speech to text", "Errors", "Outputs", "Process"]


def test_assets_use_only_known_metric_names() -> None:
    used = {name for name in _used_names() if name.startswith("callgate_")}
    assert used, "no callgate_* metric found in the assets"
    unknown = sorted(used - KNOWN)
    assert not unknown, f"metrics not in the gateway's list: {unknown}"


# -- against a running gateway -------------------------------------------------------------------


def _exposed_names(text: str) -> set[str]:
    """Metric names in an exposition: declared families (also those with no series yet)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE ") or line.startswith("# HELP "):
            names.add(_base(line.split()[2]))
        elif line and not line.startswith("#"):
            names.add(_base(re.split(r"[{ ]", line, maxsplit=1)[0]))
    return names


async def _promtool_check_metrics(exposition: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        _promtool(),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(exposition.encode()), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_running_gateway_exposes_every_metric_the_assets_use(tmp_path: Path) -> None:
    async with running_gateway(settings_for(tmp_path), hello_engine()) as gw:
        closed = await send_messages(
            gw.ws(), call_messages("CA00000000000000000000000000000042", 1.0)
        )
        assert (closed.code, closed.reason) == (1000, "stop")
        await gw.idle()
        exposition = await gw.metrics()

    # promtool lints the exposition: a parse error and every lint problem (a counter without
    # _total, a non-base unit, a missing HELP, ...) exits 1. No lint message is tolerated: the
    # gateway's names follow the Prometheus conventions, and a new metric must too.
    code, out = await _promtool_check_metrics(exposition)
    assert code == 0, f"promtool check metrics:\n{out}"
    assert out.strip() == "", out

    exposed = _exposed_names(exposition)
    missing = sorted(_used_names() - exposed)
    assert not missing, f"used by alerts.yml / callgate.json but not exposed: {missing}"
