"""The one backoff of every retry and restart in Shoal: a first delay that doubles per attempt up to a cap.

Pure (no clock, no sleeping): callers ask for the delay of the n-th consecutive attempt and wait it out their own
way (a JetStream ``nak(delay)``, a supervisor's restart time).
"""

from __future__ import annotations

from dataclasses import dataclass

# Past 2**16 the cap has long been reached; capping the exponent keeps a huge attempt count from overflowing the
# float conversion.
MAX_EXPONENT = 16


@dataclass(frozen=True)
class Backoff:
    first: float
    cap: float
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        """Seconds before attempt ``attempt + 1`` after ``attempt`` consecutive failures (attempt 0 counts as 1)."""
        exponent = min(max(0, attempt - 1), MAX_EXPONENT)
        return float(min(self.cap, self.first * self.factor**exponent))


# A redelivered message: quick recovery from blips, no hammering of a dead store.
REDELIVERY = Backoff(first=0.5, cap=30.0)
# A child process that exited (a service under ``shoal up``, a mount process under the agent): a crash loop costs
# little and recovers quickly, and a broken child does not spin.
RESTART = Backoff(first=1.0, cap=30.0)
