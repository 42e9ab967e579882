"""Build the text corpus for the tiny DSA checkpoint from pinned Debian packages.

Sources (real text nobody here wrote, byte-for-byte reproducible from the Debian archive):
  * the reStructuredText sources of the Python 3.11 docs (`python3.11-doc`, `html/_sources/**/*.rst.txt`);
  * the CPython 3.11 standard library sources (`libpython3.11-minimal`, `libpython3.11-stdlib`,
    `usr/lib/python3.11/**/*.py`) without test suites and without generated data tables.

Each document goes to train / calibration / evaluation by a hash of its path alone, so adding or
removing a file never moves another one. Outputs (all under --work, git-ignored):
  debs/*.deb, root/ (unpacked), corpus/{train,calib,eval}.jsonl  ({"id", "text"} per line)
and, in the repository: scripts/data/tiny_corpus_manifest.json (versions, .deb sha256, per-split file
lists with sizes and content hashes) and calib/samples/python-docs-calib.jsonl (raw calibration text).

    python scripts/tiny_corpus.py --work .work/tiny
"""

import argparse
import hashlib
import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSION = "3.11.2-6+deb12u8"  # Debian 12 (bookworm) main; snapshot.debian.org keeps it after it is superseded
DEBS = {
    "python3.11-doc": "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
    "libpython3.11-minimal": "f3beaa03994ffedacf73c43a0843d53b062d347115d8af65bee2034552a4e6f9",
    "libpython3.11-stdlib": "890b3540dad8a1ccc0deeca025db735bcc82629a76adacbe3b50fcc06ed528ca",
}
DOCS_DIR = "usr/share/doc/python3.11/html/_sources"
LIB_DIR = "usr/lib/python3.11"
SPLITS = (("train", 90), ("calib", 95), ("eval", 100))  # cumulative percent of the path-hash buckets
CALIB_SAMPLE = REPO / "calib" / "samples" / "python-docs-calib.jsonl"
CALIB_SAMPLE_BYTES = 240_000  # ~64K tokens: 16 windows x 1024 tokens four times over
CALIB_MIN_DOC_BYTES = 6_000  # documents long enough to fill a 1024-token window
CALIB_MAX_DOC_BYTES = 24_000  # longer ones are cut at a line end, so that more documents fit
MANIFEST = REPO / "scripts" / "data" / "tiny_corpus_manifest.json"


def fetch(work: Path) -> Path:
    """Download the pinned .debs (verifying sha256) and unpack them; returns the unpacked root."""
    debs, root = work / "debs", work / "root"
    debs.mkdir(parents=True, exist_ok=True)
    for pkg, sha in DEBS.items():
        found = sorted(debs.glob(f"{pkg}_*.deb"))
        if not found:
            subprocess.run(["apt-get", "download", f"{pkg}={VERSION}"], cwd=debs, check=True)
            found = sorted(debs.glob(f"{pkg}_*.deb"))
        digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
        if digest != sha:
            raise SystemExit(f"{found[0].name}: sha256 {digest} != pinned {sha}")
        subprocess.run(["dpkg", "-x", str(found[0]), str(root)], check=True)
    return root


def excluded(rel: str, text: str) -> bool:
    """Test suites, a generated copy of the docs, and generated codec tables are not corpus text."""
    parts = rel.split("/")
    return (
        "test" in parts
        or "tests" in parts
        or "idle_test" in parts
        or rel == "pydoc_data/topics.py"  # the docs again, as one Python string
        or "generated from" in text[:400]
        and "gencodec.py" in text[:400]
    )


def documents(root: Path) -> list[tuple[str, str]]:
    """[(doc_id, text)] sorted by id: `docs/<path>` for .rst sources, `stdlib/<path>` for modules."""
    docs = []
    for path in (root / DOCS_DIR).rglob("*.rst.txt"):
        docs.append(("docs/" + path.relative_to(root / DOCS_DIR).as_posix(), path.read_text("utf-8")))
    for path in (root / LIB_DIR).rglob("*.py"):
        rel = path.relative_to(root / LIB_DIR).as_posix()
        text = path.read_text("utf-8", errors="strict")
        if not excluded(rel, text):
            docs.append(("stdlib/" + rel, text))
    return sorted(docs)


def split_of(doc_id: str) -> str:
    bucket = int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 100
    return next(name for name, upper in SPLITS if bucket < upper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / ".work" / "tiny")
    args = ap.parse_args()

    root = fetch(args.work)
    out = args.work / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[tuple[str, str]]] = {name: [] for name, _ in SPLITS}
    for doc_id, text in documents(root):
        by_split[split_of(doc_id)].append((doc_id, text))

    manifest = {
        "packages": {pkg: {"version": VERSION, "sha256": sha} for pkg, sha in DEBS.items()},
        "split_rule": "bucket = int(sha256(doc_id)) % 100; train < 90 <= calib < 95 <= eval",
        "splits": {},
    }
    for name, docs in by_split.items():
        path = out / f"{name}.jsonl"
        with path.open("w") as f:
            for doc_id, text in docs:
                f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
        manifest["splits"][name] = {
            "documents": len(docs),
            "bytes": sum(len(t.encode()) for _, t in docs),
            "jsonl_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "files": {d: [len(t.encode()), hashlib.sha256(t.encode()).hexdigest()[:16]] for d, t in docs},
        }
        print(f"{name:6s} {len(docs):5d} docs {manifest['splits'][name]['bytes'] / 1e6:7.2f} MB")

    # Calibration sample: the first CALIB_MAX_DOC_BYTES (cut at a line end) of each long document of
    # the calibration split, in a fixed order, docs and code interleaved so any prefix holds both.
    long_docs = [d for d in by_split["calib"] if len(d[1].encode()) >= CALIB_MIN_DOC_BYTES]
    prose = [d for d in long_docs if d[0].startswith("docs/")]
    code = [d for d in long_docs if d[0].startswith("stdlib/")]
    ordered = [d for pair in zip(prose, code, strict=False) for d in pair]
    ordered += prose[len(code) :] + code[len(prose) :]
    sample, size = [], 0
    for doc_id, text in ordered:
        if size >= CALIB_SAMPLE_BYTES:
            break
        if len(text.encode()) > CALIB_MAX_DOC_BYTES:
            text = text.encode()[:CALIB_MAX_DOC_BYTES].decode("utf-8", errors="ignore")
            text = text[: text.rfind("\n") + 1]
        sample.append({"id": doc_id, "text": text})
        size += len(text.encode())
    CALIB_SAMPLE.parent.mkdir(parents=True, exist_ok=True)
    with CALIB_SAMPLE.open("w") as f:
        for row in sample:
            f.write(json.dumps(row) + "\n")
    manifest["calib_sample"] = {
        "path": CALIB_SAMPLE.relative_to(REPO).as_posix(),
        "documents": [r["id"] for r in sample],
        "bytes": size,
        "sha256": hashlib.sha256(CALIB_SAMPLE.read_bytes()).hexdigest(),
    }
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"calib sample: {len(sample)} docs, {size / 1e3:.0f} KB -> {CALIB_SAMPLE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
