"""The playbook parses and passes ansible-lint's production profile."""

from __future__ import annotations

import subprocess


def test_syntax_check_of_the_site_playbook_with_the_example_inventory(ansible) -> None:
    exe = ansible.require_tool("ansible-playbook")
    proc = subprocess.run(
        [exe, "--syntax-check", "-i", "inventory/example/hosts.yml", "site.yml"],
        cwd=ansible.dir,
        env=ansible.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ansible_lint_production_profile_passes(ansible) -> None:
    exe = ansible.require_tool("ansible-lint")
    proc = subprocess.run(
        [exe, "--profile", "production", "--offline", "--nocolor"],
        cwd=ansible.dir,
        env=ansible.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "Profile 'production' was required, and it passed" in report, report
