"""What a mount's status says about a down cache directory: the path written one way, and what brings it back."""

from __future__ import annotations

from services.agent.mountstatus import MountStatus, problems_of


def test_a_down_cache_directory_says_what_brings_it_back_with_its_path_written_one_way() -> None:
    # "cache directory /var/cache//shoal/./default/x/ is down" told the operator nothing to do: a tier whose folder
    # was removed stays down under the running mount (it never recreates the folder), until it is made again.
    status = MountStatus(pid=1, down=["/var/cache//shoal/./default/x/"])
    assert problems_of("default", "x", status) == [
        "mount default/x: cache directory /var/cache/shoal/default/x is down (its I/O failed: removed, full or a "
        "failing disk; reads go to the store): Shoal does not recreate it under a running mount; recreate it "
        "(mkdir -p /var/cache/shoal/default/x) or free space there, and the first block cached after the 30 s "
        "cool-down brings it back; restarting the agent also does (its mounts start again and create it)"]


def test_no_problem_while_no_directory_is_down() -> None:
    assert problems_of("default", "x", MountStatus(pid=1)) == []
