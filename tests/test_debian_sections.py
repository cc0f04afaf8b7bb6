"""The accuracy data set's builder on a hand-made apt index: join on Description-md5, section prefixes
stripped, splits by source package (siblings never straddle train and test), per-class cap."""

from __future__ import annotations

from bench.debian_sections import build, join_records

DUMPAVAIL = "\n".join(f"""Package: {pkg}
Source: {src}
Version: 1.0
Description: {short}
Description-md5: {md5}
Section: {section}
""" for pkg, src, short, md5, section in [
    ("chess", "chess (1.0-1)", "chess", "m1", "games"),
    ("chess-data", "chess", "chess data", "m2", "games"),
    ("dnsd", "dnsd", "dns", "m3", "net"),
    ("fw", "fw", "fw", "m4", "contrib/net"),
    ("nofmt", "nofmt", "x", "m9", "net"),             # no translation → dropped
    ("libfoo", "libfoo", "foo", "m5", "libs"),        # not a topical class
])

TRANSLATION = "\n".join(f"""Package: {pkg}
Description-md5: {md5}
Description-en: {short}
 Long text line one.
 .
 Line  two.
""" for pkg, md5, short in [("chess", "m1", "Chess game"), ("chess-data", "m2", "Chess data"),
                            ("dnsd", "m3", "DNS daemon"), ("fw", "m4", "Firewall"), ("libfoo", "m5", "Foo")])


def test_join_cleans_text_strips_prefixes_and_keeps_the_source():
    records = {r["package"]: r for r in join_records(DUMPAVAIL, TRANSLATION)}
    assert set(records) == {"chess", "chess-data", "dnsd", "fw", "libfoo"}
    assert records["chess"]["text"] == "Chess game Long text line one. Line two."
    assert records["chess"]["synopsis"] == "Chess game"
    assert records["fw"]["label"] == "net" and records["chess"]["source"] == "chess"
    assert records["chess-data"]["source"] == "chess"


def test_splits_follow_source_packages_and_the_cap_holds():
    records = [{"package": f"p{i}", "source": f"s{i // 3}", "label": ("games", "net")[i % 2], "text": f"t{i}"}
               for i in range(600)] + [{"package": "x", "source": "x", "label": "libs", "text": "lib"}]
    splits = build(records, cap=200)
    where = {r["source"]: name for name, rows in splits.items() for r in rows}
    for name, rows in splits.items():
        assert all(where[r["source"]] == name for r in rows)  # one source, one split
    labels = [r["label"] for rows in splits.values() for r in rows]
    assert labels.count("games") == labels.count("net") == 200 and "libs" not in labels
    assert 0.1 < len(splits["test"]) / 400 < 0.3 and splits["train"]
