"""The README's first fenced block holds the two set-up commands (main job, then tests), and
.ci/run runs the second one verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("```")
    start = text.index("\n", start) + 1
    end = text.index("```", start)
    return [line for line in text[start:end].splitlines() if line.strip()]


def test_readme_starts_with_main_job_and_test_command():
    lines = first_block()
    assert len(lines) == 2, lines
    main, test = lines
    assert "pip install torch==2.13.0" in main and "qmamba " in main
    assert "pip install torch==2.13.0" in test and "pytest" in test


def test_ci_runs_the_readme_test_command():
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert first_block()[1] in ci
