"""The speed benchmark names the CPU each row came from: the model name, and the family and model numbers that tell
AMD's Zen 3, Zen 4 and Zen 5 apart (all three read "AMD EPYC" here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.speed.run import cpu_numbers, cpu_record, encoder_markdown


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo (not Linux)")
def test_the_record_holds_this_cpus_family_and_model_and_the_markdown_prints_them():
    cpu = cpu_record()
    assert cpu["family"].isdigit() and cpu["model_number"].isdigit(), cpu
    line = encoder_markdown({"cpu": cpu, "encoder": []})[0]
    assert line.startswith(f"CPU: {cpu['model']} (") and f"family {cpu['family']}, model {cpu['model_number']})" in line


def test_results_recorded_before_the_numbers_print_as_before():
    assert cpu_numbers({"model": "AMD EPYC", "instruction_sets": []}) == ""
    assert cpu_numbers({"vendor": "AuthenticAMD", "family": "26", "model_number": "2"}) == \
        " (AuthenticAMD, family 26, model 2)"
