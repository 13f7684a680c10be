"""The Channels layer against channels-redis's own layer tests, inside a real sticky-server of 3 workers.

The channels-redis sdist on PyPI ships its layer tests (``tests/test_core.py``); it is
downloaded at a pinned version (never copied here), and run in worker 0 of a real
sticky-server with ``channels_redis.core.RedisChannelLayer`` replaced by a shim over
``StickyChannelLayer`` (its Redis options mean nothing there), so their sends, group
sends and flushes go over the master's channel. What does not apply, and why:

- ``test_default_group_key_format``, ``test_custom_group_key_format``: the Redis key a
  group is stored under (``_group_key``); there are no Redis keys.
- ``test_receive_buffer_respects_capacity``: channels-redis's internal receive buffer
  (``receive_buffer``); this layer has none.

Their two ``xfail`` tests stay as they mark them.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from .conftest import StartApp
from .harness import HERE

CHANNELS_REDIS = "channels-redis==4.3.0"
SDIST = "channels_redis-4.3.0"
NOT_APPLICABLE = {
    "test_default_group_key_format": "the Redis key a group is stored under",
    "test_custom_group_key_format": "the Redis key a group is stored under",
    "test_receive_buffer_respects_capacity": "channels-redis's internal receive buffer",
}
ARTIFACTS = HERE.parent / "artifacts"

SHIM = '''"""channels-redis's layer, as its tests make it, over sticky_server's Channels layer."""

from channels.exceptions import ChannelFull

from sticky_server.adapters.channels import StickyChannelLayer

__all__ = ["ChannelFull", "RedisChannelLayer"]


class RedisChannelLayer(StickyChannelLayer):
    def __init__(self, hosts=None, prefix="asgi", expiry=60, group_expiry=86400, capacity=100,
                 channel_capacity=None, symmetric_encryption_keys=None, random_prefix_length=12,
                 serializer_format="msgpack"):
        super().__init__(expiry=expiry, group_expiry=group_expiry, capacity=capacity,
                         channel_capacity=channel_capacity, prefix=prefix)

    async def close_pools(self):
        pass
'''


def their_tests(folder: Path) -> Path:
    """Their ``test_core.py`` from the pinned sdist (downloaded once into tests/artifacts), and the shim."""
    ARTIFACTS.mkdir(exist_ok=True)
    archive = ARTIFACTS / f"{SDIST}.tar.gz"
    if not archive.exists():
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*command, CHANNELS_REDIS, "-d", str(ARTIFACTS)], check=True, timeout=180)
    with tarfile.open(archive) as sdist:
        member = sdist.extractfile(f"{SDIST}/tests/test_core.py")
        assert member is not None
        (folder / "test_core.py").write_bytes(member.read())
    (folder / "channels_redis").mkdir()
    (folder / "channels_redis" / "__init__.py").write_text("")
    (folder / "channels_redis" / "core.py").write_text(SHIM)
    return folder


@pytest.mark.timeout(300)
def test_channels_redis_own_layer_tests_pass_inside_a_sticky_server(start_app: StartApp, tmp_path: Path) -> None:
    pytest.importorskip("pytest_asyncio")
    folder = tmp_path / "theirs"
    folder.mkdir()
    their_tests(folder)
    result = tmp_path / "junit.xml"
    deselect = " and ".join(f"not {name}" for name in NOT_APPLICABLE)
    app = start_app(
        script=HERE / "apps" / "channels_conformance.py",
        env={"APP_TESTS": str(folder), "APP_RESULT": str(result), "APP_DESELECT": deselect},
    )
    code = int(app.wait_for(r"CONFORMANCE (\d+)", 240).group(1))
    cases = ElementTree.parse(result).getroot().iter("testcase")
    outcomes = {case.get("name", ""): [child.tag for child in case] for case in cases}
    failed = {name: tags for name, tags in outcomes.items() if {"failure", "error"} & set(tags)}
    assert code == 0 and not failed, (failed, app.output_tail(80))
    ran = {name.partition("[")[0] for name, tags in outcomes.items() if "skipped" not in tags}
    assert len(ran) >= 20 and not ran & set(NOT_APPLICABLE), sorted(ran)
