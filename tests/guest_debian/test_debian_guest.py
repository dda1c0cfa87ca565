"""The Debian guest as users run it: default boot options, 2 vCPUs, reached over ssh."""

from __future__ import annotations

from vims.collector.guest import Guest


def test_boots_with_the_default_command_line_and_two_vcpus(debian: Guest) -> None:
    cmdline = debian.run("cat /proc/cmdline", check=True).split()
    assert "nokaslr" not in cmdline and "pti=off" not in cmdline
    assert "root=/dev/vda" in cmdline
    assert debian.run("nproc", check=True).strip() == "2"
    assert debian.run("id -un", check=True).strip() == "root"


def test_services_answer_over_the_forwarded_ports(debian: Guest) -> None:
    assert debian.http_address is not None
    page = debian.run("curl -s http://127.0.0.1/ 2>/dev/null || wget -qO- http://127.0.0.1/ 2>/dev/null"
                      " || php -r 'echo file_get_contents(\"http://127.0.0.1/index.php\");'")
    assert "vims" in page
    for service in ("ssh", "nginx", "php8.2-fpm", "cron"):
        assert debian.run(f"systemctl is-active {service}").strip() == "active", service


def test_a_failing_command_reports_its_status(debian: Guest) -> None:
    rc, text = debian.execute("echo out; echo err >&2; exit 3", timeout=20)
    assert rc == 3 and "out" in text and "err" in text


def test_status_names_the_image_and_the_ports(debian: Guest) -> None:
    status = debian.status()
    assert status["image"] == "debian" and status["smp"] == 2 and status["memory_mb"] == 1024
    assert status["ssh"]["port"] == debian.ssh_address[1]  # type: ignore[index]
    assert "kaslr" in status and "error" not in status["kaslr"]
