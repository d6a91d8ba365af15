import subprocess
import sys

import pytest

from stemstream.catalog import Catalog
from stemstream.counting.params import CountingParams
from stemstream.errors import CatalogError


@pytest.fixture
def catalog(tmp_path):
    cat = Catalog(f"sqlite:///{tmp_path}/cat.sqlite")
    yield cat
    cat.close()


def test_scans_round_trip_with_session(catalog):
    catalog.start_session("s1", "local", 1, CountingParams(background_n_sigma=4.0))
    sid = catalog.session_id("s1")
    catalog.upsert_scan(7, session_id=sid, scan_rows=4, scan_cols=8, route="stream", status="counting")
    catalog.upsert_scan(7, status="counted", events=123, counted_path="/x/scan_7_counted.h5", progress=1.0)
    catalog.upsert_scan(8, route="disk", raw_paths=["/raw/a.data"])
    row = catalog.get_scan(7)
    assert (row.status, row.events, row.route, row.scan_cols) == ("counted", 123, "stream", 8)
    assert row.location == "/x/scan_7_counted.h5"
    assert [s.scan_number for s in catalog.list_scans("s1")] == [7]
    assert [s.scan_number for s in catalog.list_scans()] == [7, 8]


def test_unknown_scan_says_what_to_do(catalog):
    with pytest.raises(CatalogError, match="catalog list"):
        catalog.get_scan(99)


def test_unknown_field_rejected(catalog):
    with pytest.raises(CatalogError, match="unknown scan fields"):
        catalog.upsert_scan(1, colour="red")


def test_bad_url_is_one_line():
    with pytest.raises(CatalogError, match="STEMSTREAM_CATALOG_URL") as info:
        Catalog("nosuchdialect://x")
    assert "\n" not in str(info.value)


def test_cli_lists_scans(tmp_path):
    url = f"sqlite:///{tmp_path}/cat.sqlite"
    cat = Catalog(url)
    cat.upsert_scan(3, route="disk", status="on_disk", raw_paths=["/fallback/data_scan0000000003_module0.data"])
    cat.close()
    out = subprocess.run(
        [sys.executable, "-m", "stemstream.cli", "catalog", "--url", url, "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "disk" in out and "module0" in out
    bad = subprocess.run(
        [sys.executable, "-m", "stemstream.cli", "catalog", "--url", url, "show", "42"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "unknown scan 42" in bad.stderr
