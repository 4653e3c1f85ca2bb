"""The repository stands alone: no file points outside it, and the docs' links resolve.

Walks the files git knows (tracked, plus untracked ones that .gitignore does not exclude), or
the tree minus .git/.venv where git is not available.
"""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Spelled in parts so that this file does not match itself.
SHARED = "shared"
FORBIDDEN = ("../" + SHARED, *(f"{SHARED}/{name}.md" for name in ("method", "findings", "style")))
README_MAX_LINES = 220
SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", "build"}
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")


def repo_files() -> list[pathlib.Path]:
  try:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, check=True, capture_output=True).stdout
    names = [n for n in out.decode().split("\0") if n]
  except (OSError, subprocess.CalledProcessError):
    names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
             if p.is_file() and not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
  return [ROOT / n for n in names if (ROOT / n).is_file()]


def test_no_file_refers_outside_the_repository():
  files = repo_files()
  assert any(f.name == "README.md" for f in files) and len(files) > 20
  hits = []
  for path in files:
    try:
      text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
      continue  # Binary files.
    for n, line in enumerate(text.splitlines(), 1):
      hits += [f"{path.relative_to(ROOT)}:{n}: {bad}" for bad in FORBIDDEN if bad in line]
  assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_readme_is_short():
  n = len((ROOT / "README.md").read_text().splitlines())
  assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move " \
                                "detail into docs/"


def slug(heading: str) -> str:
  """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to '-'."""
  text = re.sub(r"[`*_]", "", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
  text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # No headings in code blocks.
  return {slug(m) for m in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


def doc_files() -> list[pathlib.Path]:
  return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_slug_matches_github():
  assert slug("Personalization of a diffusion model (Fashion-MNIST sneakers)") == \
      "personalization-of-a-diffusion-model-fashion-mnist-sneakers"
  assert slug("The demo: health-news tweets, target `bbchealth`") == \
      "the-demo-health-news-tweets-target-bbchealth"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
  text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
  broken = []
  for target in LINK.findall(text):
    if re.match(r"[a-z]+:", target):
      continue  # http(s):, mailto:
    file_part, _, anchor = target.partition("#")
    dest = (doc.parent / file_part).resolve() if file_part else doc
    if not dest.exists():
      broken.append(f"{target} (no such file)")
    elif not dest.resolve().is_relative_to(ROOT):
      broken.append(f"{target} (outside the repository)")
    elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
      broken.append(f"{target} (no heading with that anchor)")
  assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"
