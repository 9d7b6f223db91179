"""Seeded arrival processes (pure; the live load generator and the simulator share them).

`arrivals(process, params, duration_s, seed)` returns sorted arrival offsets in seconds,
in [0, duration_s). `rate_at(process, params, t_s, duration_s)` is the instantaneous rate.

- `poisson`: `rate_rps` (constant).
- `ramp`: `low_rps` -> `high_rps` linearly until `peak_at` x duration (default 0.5), then
  back down to `low_rps` at the end.
- `burst`: `base_rps`, plus spikes of `burst_rps` (height, total rate during a spike) lasting
  `width_s`, every `period_s`, the first starting at `first_at_s` (default period_s / 2).
- `trace`: `timestamps` (seconds, replayed as given, shifted so the first is 0 unless
  `shift` is false) or `rates_rps` (one rate per second, Poisson within each second);
  `load_trace_csv` reads either from a CSV.
Non-constant rates are sampled by thinning a Poisson process at the peak rate, so a seed
gives the same arrivals on every machine (numpy PCG64).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROCESSES = ("poisson", "ramp", "burst", "trace")
MAX_ARRIVALS = 50_000_000


class ArrivalError(ValueError):
    """Bad arrival-process name or parameters (the message names the field and value)."""


def _num(params: Mapping[str, Any], name: str, default: float | None = None,
         minimum: float = 0.0) -> float:  # fmt: skip
    value = params.get(name, default)
    if value is None:
        raise ArrivalError(f"{name} is required")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ArrivalError(f"{name}={value!r}: must be a number")
    v = float(value)
    if not math.isfinite(v) or v < minimum:
        raise ArrivalError(f"{name}={value!r}: must be a finite number >= {minimum}")
    return v


def rate_at(process: str, params: Mapping[str, Any], t_s: float, duration_s: float) -> float:
    """Instantaneous arrival rate (requests/s) at offset `t_s`."""
    if process == "poisson":
        return _num(params, "rate_rps")
    if process == "ramp":
        low, high = _num(params, "low_rps"), _num(params, "high_rps")
        peak_at = _num(params, "peak_at", 0.5)
        if peak_at > 1:
            raise ArrivalError(f"peak_at={peak_at!r}: must be within [0, 1]")
        t_peak = peak_at * duration_s
        if t_s <= t_peak:
            frac = t_s / t_peak if t_peak > 0 else 1.0
        else:
            rest = duration_s - t_peak
            frac = 1.0 - (t_s - t_peak) / rest if rest > 0 else 1.0
        return low + (high - low) * min(1.0, max(0.0, frac))
    if process == "burst":
        base, height = _num(params, "base_rps"), _num(params, "burst_rps")
        width, period = _num(params, "width_s"), _num(params, "period_s")
        if period <= 0:
            raise ArrivalError(f"period_s={period!r}: must be > 0")
        first = _num(params, "first_at_s", period / 2)
        if t_s < first:
            return base
        return height if (t_s - first) % period < width else base
    if process == "trace":
        rates = params.get("rates_rps")
        if rates is None:
            raise ArrivalError("rate_at for a timestamp trace is undefined; give rates_rps")
        i = int(t_s)
        return float(rates[i]) if 0 <= i < len(rates) else 0.0
    raise ArrivalError(f"process={process!r}: must be one of {', '.join(PROCESSES)}")


def peak_rate(process: str, params: Mapping[str, Any], duration_s: float) -> float:
    if process == "poisson":
        return _num(params, "rate_rps")
    if process == "ramp":
        return max(_num(params, "low_rps"), _num(params, "high_rps"))
    if process == "burst":
        return max(_num(params, "base_rps"), _num(params, "burst_rps"))
    if process == "trace":
        return max((float(r) for r in params.get("rates_rps") or [0.0]), default=0.0)
    raise ArrivalError(f"process={process!r}: must be one of {', '.join(PROCESSES)}")


def arrivals(
    process: str, params: Mapping[str, Any], duration_s: float, seed: int
) -> np.ndarray:
    """Sorted arrival offsets (seconds) in [0, duration_s)."""
    if process not in PROCESSES:
        raise ArrivalError(f"process={process!r}: must be one of {', '.join(PROCESSES)}")
    if not math.isfinite(duration_s) or duration_s <= 0:
        raise ArrivalError(f"duration_s={duration_s!r}: must be a finite number > 0")
    rng = np.random.default_rng(seed)
    if process == "trace":
        return _trace(params, duration_s, rng)
    peak = peak_rate(process, params, duration_s)
    if peak <= 0:
        return np.zeros(0)
    if peak * duration_s > MAX_ARRIVALS:
        raise ArrivalError(f"peak rate {peak} x duration_s {duration_s} exceeds {MAX_ARRIVALS}")
    n = rng.poisson(peak * duration_s)
    times = np.sort(rng.uniform(0.0, duration_s, size=n))
    if process == "poisson":
        return times
    rates = np.array([rate_at(process, params, float(t), duration_s) for t in times])
    keep = rng.uniform(0.0, peak, size=n) < rates
    out: np.ndarray = times[keep]
    return out


def _trace(params: Mapping[str, Any], duration_s: float, rng: np.random.Generator) -> np.ndarray:
    scale = _num(params, "scale", 1.0)
    if "timestamps" in params:
        ts = np.sort(np.asarray(params["timestamps"], dtype=np.float64))
        if ts.size and not np.all(np.isfinite(ts)):
            raise ArrivalError("timestamps: must all be finite numbers")
        if ts.size and params.get("shift", True):
            ts = ts - ts[0]
        ts = ts / scale if scale > 0 else ts  # scale > 1 replays faster (more load)
        out: np.ndarray = ts[(ts >= 0) & (ts < duration_s)]
        return out
    rates = params.get("rates_rps")
    if rates is None:
        raise ArrivalError("trace needs timestamps or rates_rps")
    chunks: list[np.ndarray] = []
    for second, raw in enumerate(rates):
        if second >= duration_s:
            break
        rate = float(raw) * scale
        if not math.isfinite(rate) or rate < 0:
            raise ArrivalError(f"rates_rps[{second}]={raw!r}: must be a finite number >= 0")
        span = min(1.0, duration_s - second)
        n = rng.poisson(rate * span)
        chunks.append(second + np.sort(rng.uniform(0.0, span, size=n)))
    return np.concatenate(chunks) if chunks else np.zeros(0)


def load_trace_csv(path: str | Path) -> dict[str, Any]:
    """Read a trace: a `ts_s` column (timestamps) or a `rate_rps` column (one row per second).

    A file without a header is read as timestamps in its first column.
    """
    p = Path(path)
    with p.open(newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    if not rows:
        raise ArrivalError(f"trace {p}: empty")
    header = [h.strip().lower() for h in rows[0]]
    body = rows[1:] if not _is_number(rows[0][0]) else rows
    col_name = "ts_s"
    col = 0
    if not _is_number(rows[0][0]):
        if "rate_rps" in header:
            col_name, col = "rate_rps", header.index("rate_rps")
        elif "ts_s" in header:
            col = header.index("ts_s")
        else:
            raise ArrivalError(f"trace {p}: needs a ts_s or rate_rps column, got {header}")
    values: list[float] = []
    for line, row in enumerate(body, start=2 if body is not rows else 1):
        try:
            values.append(float(row[col]))
        except (ValueError, IndexError) as exc:
            raise ArrivalError(f"trace {p} line {line}: {col_name}={row!r}: not a number") from exc
    return {"rates_rps": values} if col_name == "rate_rps" else {"timestamps": values}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """`["rate_rps=20", "width_s=2"]` -> {"rate_rps": 20.0, "width_s": 2.0} (CLI helper)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ArrivalError(f"parameter {item!r}: expected name=value")
        try:
            out[key] = float(raw)
        except ValueError:
            out[key] = raw
    return out
