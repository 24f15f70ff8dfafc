"""Time windows of the production log: the daily check's last N days, the monthly flow's previous month."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from components.errors import UsageError

log = logging.getLogger(__name__)

_RELATIVE = re.compile(r"^\s*(\d+)\s*([dh])\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Window:
    """A half-open UTC interval [since, until) of the production log; `timezone` is the plant's, whose calendar
    days the quality report's per-day figures follow."""

    since: datetime
    until: datetime
    timezone: str = "UTC"

    @property
    def days(self) -> float:
        return (self.until - self.since).total_seconds() / 86400

    @property
    def label(self) -> str:
        return f"{self.since.isoformat(timespec='seconds')} .. {self.until.isoformat(timespec='seconds')}"

    def as_dict(self) -> dict[str, Any]:
        return {"since": self.since.isoformat(timespec="seconds"), "until": self.until.isoformat(timespec="seconds"),
                "days": round(self.days, 3)}


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_moment(text: str, now: datetime, option: str = "--since") -> datetime:
    """'7d' (7 days before now), '12h', an ISO date (midnight UTC) or an ISO datetime (naive = UTC)."""
    relative = _RELATIVE.match(text)
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2).lower()
        return now - (timedelta(days=amount) if unit == "d" else timedelta(hours=amount))
    try:
        return _utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise UsageError(f"{option} {text!r}: not a moment; give an ISO date/time (2025-06-01, "
                         "2025-06-01T08:00) or a count of days/hours ago (30d, 12h)") from None


def resolve_window(since: str | None, until: str | None, default_days: int,
                   now: datetime | None = None) -> Window:
    """The window for `--since`/`--until`: until defaults to now, since to `default_days` before until. An until
    in the future ends the window now: nothing is logged there yet, and a window reaching into it would pass for
    one whose days were all served (the production baseline of a new deployment, say)."""
    now = _utc(now or datetime.now(UTC))
    end = parse_moment(until, now, "--until") if until else now
    if end > now:
        log.info("--until %s is in the future: the window ends now, %s", end.isoformat(), now.isoformat())
        end = now
    start = parse_moment(since, now, "--since") if since else end - timedelta(days=default_days)
    if start >= end:
        raise UsageError(f"window {start.isoformat()} .. {end.isoformat()} is empty; --since must be before "
                         "--until")
    return Window(start, end)


def last_days(days: int, now: datetime | None = None, timezone: str = "UTC") -> Window:
    """The daily check's window: the last `days` days up to now (per-day figures in the plant's `timezone`)."""
    end = _utc(now or datetime.now(UTC))
    return Window(end - timedelta(days=days), end, _zone(timezone).key)


def _zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"timezone {timezone!r}: not an IANA timezone; give the monthly schedule's, as in "
                         "prefect.yaml (Europe/Berlin, Asia/Shanghai, UTC)") from None


def previous_month(today: date | datetime | None = None, timezone: str = "UTC") -> Window:
    """The monthly flow's window: the calendar month before `today` (default now) in `timezone`, the zone of
    the monthly schedule, as UTC. A date is taken as the plant's; a naive datetime as UTC."""
    plant = _zone(timezone)
    today = today or datetime.now(UTC)
    day = _utc(today).astimezone(plant).date() if isinstance(today, datetime) else today
    first_this = datetime(day.year, day.month, 1, tzinfo=plant)
    last_month = first_this.date() - timedelta(days=1)
    first_last = datetime(last_month.year, last_month.month, 1, tzinfo=plant)
    return Window(first_last.astimezone(UTC), first_this.astimezone(UTC), plant.key)
