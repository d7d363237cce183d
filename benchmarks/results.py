"""benchmarks/RESULTS.md: each benchmark adds its entries under its own "## ..." section."""


def append_to_section(path, section, entry):
    """Add `entry` at the end of `section` ("## ..." heading) of a markdown file, creating either if missing."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else ["# Benchmark results"]
    if section not in lines:
        lines += ["", section]
    start = lines.index(section)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    body_end = end
    while body_end > start + 1 and not lines[body_end - 1].strip():   # the blank lines before the next section
        body_end -= 1
    lines[body_end:end] = [""] + entry.rstrip("\n").splitlines() + ([""] if end < len(lines) else [])
    path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
