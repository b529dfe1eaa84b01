from __future__ import annotations

from datetime import timedelta

import pytest

from curtailment.models import Device
from fleetops.lib import clock


def make_fleet(org, n=10, *, power_w=3000.0, start=0, **overrides):
    """n healthy, paired, active devices with fresh telemetry; efficiency rises with the index so
    the least efficient (highest J/TH) are the highest-numbered."""
    now = clock.now()
    devices = [
        Device(
            org=org,
            identifier=f"m-{start + i:03d}",
            driver="antminer",
            pairing_status="PAIRED",
            status="active",
            rated_power_w=int(power_w),
            last_sample_at=now - timedelta(seconds=30),
            last_power_w=power_w,
            last_hash_rate_hs=1e14,
            last_efficiency_j_th=20.0 + start + i,
            **overrides,
        )
        for i in range(n)
    ]
    return Device.objects.bulk_create(devices)


@pytest.fixture
def fleet(org):
    return make_fleet(org, 10)
