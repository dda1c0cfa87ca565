"""REM-S's web console in a real headless browser (Debian's chromium and chromium-driver, selenium).

A real REM-S (real keys, the real protocol, a real SQLite history) with two simulated A-VMs: vm-1
healthy, vm-2 whose score drops while a client is connected, so REM-S cuts that connection. The
browser must show both states on the fleet page and the reason and the cut on vm-2's page; a request
without the token is refused. Screenshots of the three pages go to build/console-screenshots/.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.postgres_fixture import postgres_server, postgres_url  # noqa: F401  (fixtures)
from vims.remote import views
from vims.remote.console import ConsoleServer
from vims.remote.keys import AvmIdentity
from vims.remote.simavm import SimulatedAvm
from vims.remote.store import Store
from vims.remote.testing import Deployment, read_all, read_line, wait_until

FAST = {"interval_s": 0.3, "deadline_s": 1.5, "attest_timeout_s": 5.0}
SHOTS = Path(__file__).resolve().parents[1] / "build" / "console-screenshots"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _sim(dep: Deployment, vm: str) -> SimulatedAvm:
    client = SimulatedAvm(dep.avms[vm], dep.endpoint, dep.keys.public).start()
    client.wait_policy(20)
    wait_until(lambda: dep.thread.call(lambda: dep.thread.server.avms[dep.avms[vm].avm_id].acked_version),
               what="policy acknowledged")
    return client


@pytest.fixture
def fleet(tmp_path):
    """A running REM-S with its console: vm-1 allowed, vm-2 cut for its score."""
    dep = Deployment(tmp_path, vms=2, policy=FAST)
    dep.start()
    avms = [_sim(dep, "vm-1"), _sim(dep, "vm-2")]
    ok = dep.connect("vm-1")
    ok.sendall(b"hello\n")
    assert read_line(ok) == b"data: hello\n"
    victim = dep.connect("vm-2")
    victim.sendall(b"hello\n")
    assert read_line(victim) == b"data: hello\n"
    avms[1].score = 0.2
    assert b"VIMS CUT behaviour score 0.200 < threshold 0.500" in read_all(victim)
    wait_until(lambda: any(d["kind"] == "cut" for d in dep.store().history("vm-2")["decisions"]),
               what="the cut recorded")
    console = ConsoleServer(dep.db, live=dep.thread.server.live).start()
    yield dep, console
    console.stop()
    ok.close()
    victim.close()
    for a in avms:
        a.stop()
    dep.stop()


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_request_without_the_token_is_refused(fleet):
    _, console = fleet
    for path in ("/", "/vm/vm-2", "/decisions", "/api/status", "/api/history/vm-2", "/api/live"):
        assert _get(console.url + path)[0] == 401
        assert _get(console.url + path + "?token=wrong")[0] == 401
        assert _get(console.url + path, {"Authorization": "Bearer " + console.token[:-1]})[0] == 401
    status, body = _get(console.url + "/api/status", {"Authorization": "Bearer " + console.token})
    assert status == 200 and {a["vm_id"] for a in json.loads(body)["avms"]} == {"vm-1", "vm-2"}
    assert _get(console.url + "/api/history/vm-2?token=" + console.token + "&limit=x")[0] == 400


#: Fields that are ages, read from the database's clock at each call (they differ between two calls).
AGES = ("age_s", "renewed_s_ago", "expires_in_s", "heartbeat_s_ago")


def _timeless(obj):
    """``obj`` without its ages (each present, a number), so two reads of an unchanging store compare equal."""
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    if isinstance(obj, dict):
        for age in AGES:
            if age in obj:
                assert isinstance(obj.pop(age), (int, float)), age
        return {k: _timeless(v) for k, v in obj.items()}
    return obj


def test_console_json_is_the_clis(fleet):
    from typer.testing import CliRunner

    from vims.cli import app

    dep, console = fleet
    dep.thread.stop()  # the same store, no longer changing
    dep.thread = None
    auth = {"Authorization": "Bearer " + console.token}
    for args, path in ((["status"], "/api/status"), (["history", "vm-2", "--limit", "7"], "/api/history/vm-2?limit=7"),
                       (["decisions", "--search", "CUT"], "/api/decisions?q=CUT")):
        result = CliRunner().invoke(app, ["remote", *args, "--json", "--home", str(dep.folder)])
        assert result.exit_code == 0, result.output
        status, body = _get(console.url + path, auth)
        assert status == 200
        assert _timeless(json.loads(body)) == _timeless(json.loads(result.output)), args
    cuts = json.loads(_get(console.url + "/api/decisions?q=CUT", auth)[1])["decisions"]
    assert cuts and all(d["kind"] == "cut" or "cut" in d["reason"].lower() for d in cuts)


@pytest.mark.skipif(not Path(CHROMEDRIVER).exists(), reason="needs chromium-driver (scripts/system-packages.sh)")
def test_the_console_in_a_real_browser(fleet):
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, console = fleet
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    if shutil.which("chromium"):
        options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    SHOTS.mkdir(parents=True, exist_ok=True)
    # The pages re-render every 2 s: an element read across a refresh goes stale, so reads are retried.
    wait = WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,))
    try:
        driver.get(console.url + "/?token=" + console.token)

        def states(d):
            rows = d.find_elements(By.CSS_SELECTOR, "#fleet tr[data-vm]")
            got = {r.get_attribute("data-vm"): r.find_element(By.CSS_SELECTOR, ".state").text for r in rows}
            return got if got == {"vm-1": "allowed", "vm-2": "refused"} else None

        assert wait.until(states)
        vm2 = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#fleet tr[data-vm='vm-2']").text)
        assert "cut" in vm2 and "behaviour score 0.200 < threshold 0.500" in vm2
        driver.save_screenshot(str(SHOTS / "fleet.png"))

        # The token is now a cookie: the VM's page opens without it in the address.
        driver.find_element(By.LINK_TEXT, "vm-2").click()
        reason = wait.until(lambda d: d.find_elements(By.ID, "reason") and d.find_element(By.ID, "reason").text)
        assert "cut" in reason and "behaviour score 0.200 < threshold 0.500" in reason
        assert wait.until(lambda d: d.find_element(By.ID, "vm-state").text) == "refused"
        assert driver.find_elements(By.CSS_SELECTOR, "#timeline polyline")
        cuts = wait.until(lambda d: [r.text for r in d.find_elements(By.CSS_SELECTOR, "#decisions tr")
                                     if " cut " in f" {r.text} "] or None)
        assert cuts and "0.200" in cuts[0]
        driver.save_screenshot(str(SHOTS / "vm.png"))

        driver.get(console.url + "/decisions")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#all-decisions tr td"))
        driver.find_element(By.ID, "search").send_keys("vm-1")
        wait.until(lambda d: all("vm-1" in r.text for r in d.find_elements(By.CSS_SELECTOR, "#all-decisions tr")[1:])
                   and len(d.find_elements(By.CSS_SELECTOR, "#all-decisions tr")) > 1)
        driver.save_screenshot(str(SHOTS / "decisions.png"))
    finally:
        driver.quit()
    assert all((SHOTS / f"{n}.png").stat().st_size > 0 for n in ("fleet", "vm", "decisions"))


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    s = Store(tmp_path / "rems.sqlite" if request.param == "sqlite" else request.getfixturevalue("postgres_url"))
    yield s
    s.close()


def test_the_views_on_both_backends(store):
    for i in (1, 2):
        store.enroll(AvmIdentity.generate(f"avm-{i}").public, f"vm-{i}", gate_port=47000 + i)
    assert [r["state"] for r in views.fleet(store)["avms"]] == ["unknown", "unknown"]
    doc = {"behaviour": {"score": 0.3, "threshold": 0.5, "top_processes": [{"pid": 7, "comm": "nc", "score": 0.1,
                                                                           "evidence": ["connect 4444"]}]},
           "checks": [{"check": "kernel-text", "status": "fail", "detail": "patched", "ts_ns": 10**18}]}
    for seq in range(1, 6):
        store.record_report(avm_id="avm-1", vm_id="vm-1", seq=seq, status="accepted", score=0.3, verdict="deny",
                            detail="score", document=json.dumps(doc), received_at=100.0 + seq)
    store.record_decision(vm_id="vm-1", conn_id="vm-1#1", kind="cut", reason="100%_score low", at=106.0)
    store.record_decision(vm_id="vm-2", conn_id="vm-2#1", kind="allow", reason="clean", at=107.0)
    store.record_report(avm_id="avm-2", vm_id="vm-2", seq=1, status="accepted", score=0.9, verdict="allow",
                        detail="ok", received_at=108.0)
    assert {r["vm_id"]: r["state"] for r in views.fleet(store)["avms"]} == {"vm-1": "refused", "vm-2": "allowed"}
    first = views.history(store, "vm-1", limit=2)
    assert [r["seq"] for r in first["reports"]] == [5, 4]
    older = views.history(store, "vm-1", limit=2, before=first["reports"][-1]["id"])
    assert [r["seq"] for r in older["reports"]] == [3, 2]
    detail = views.vm_detail(store, "vm-1")
    assert detail["failing_checks"] == ["kernel-text"] and detail["top_processes"][0]["comm"] == "nc"
    assert detail["checks"][0]["at"] == 10**9 and detail["threshold"] == 0.5
    assert views.vm_detail(store, "vm-2")["report_id"] is None  # no document kept
    assert [d["vm_id"] for d in views.decisions(store, "CUT")["decisions"]] == ["vm-1"]
    assert [d["kind"] for d in views.decisions(store, "100%_")["decisions"]] == ["cut"]
    assert views.decisions(store, "1_0")["decisions"] == []  # _ (and %) literal: "1_0" would match "100"
    assert [d["kind"] for d in views.decisions(store)["decisions"]] == ["allow", "cut"]
