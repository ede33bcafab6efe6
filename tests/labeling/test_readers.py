"""OCR readers on hand-written fixtures: expected words are written out by hand from the fixture."""

import json

import pytest

from dvsft_kernels.labeling import OCRWord
from dvsft_kernels.labeling.readers import (
    detect_format,
    parse_doctr,
    parse_hocr,
    parse_paddleocr,
    parse_tesseract_tsv,
    parse_words_json,
    read_ocr,
    split_line,
)

T = "\t"
TSV_HEADER = T.join(
    ["level", "page_num", "block_num", "par_num", "line_num", "word_num", "left", "top", "width", "height", "conf", "text"])


def tsv(*rows):
    return "\n".join([TSV_HEADER, *(T.join(map(str, r)) for r in rows)]) + "\n"


# Tesseract 5 writes a trailing tab (empty text) on non-word rows
TSV = tsv(
    (1, 1, 0, 0, 0, 0, 0, 0, 500, 120, -1, ""),
    (4, 1, 1, 1, 1, 0, 23, 36, 351, 24, -1, ""),
    (5, 1, 1, 1, 1, 1, 23, 36, 77, 24, 96.5, "Hello"),
    (5, 1, 1, 1, 1, 2, 114, 36, 87, 24, 40, "brave"),
    (5, 1, 1, 1, 1, 3, 216, 42, 62, 18, -1, ""),
    (5, 1, 1, 1, 1, 4, 290, 36, 84, 24, 0, "world"),
)


def flat(box):
    return [v for p in box for v in (p if isinstance(p, (tuple, list)) else [p])]


def words(*triples):
    return [OCRWord(t, tuple(float(v) for v in b), s) for t, b, s in triples]


class TestTesseract:
    def test_words_scores_and_skips(self):
        got = parse_tesseract_tsv(TSV)
        assert got == words(("Hello", (23, 36, 100, 60), 0.965), ("brave", (114, 36, 201, 60), 0.40),
                            ("world", (290, 36, 374, 60), 0.0))

    def test_min_score(self):
        assert [w.text for w in parse_tesseract_tsv(TSV, min_score=0.5)] == ["Hello"]
        assert [w.text for w in parse_tesseract_tsv(TSV, min_score=0.4)] == ["Hello", "brave"]

    def test_trailing_tab_stripped_row_and_crlf(self):
        text = TSV.replace("-1\t\n", "-1\n").replace("\n", "\r\n")
        assert [w.text for w in parse_tesseract_tsv(text)] == ["Hello", "brave", "world"]

    def test_pytesseract_dict(self):
        d = {"level": [1, 5, 5], "page_num": [1, 1, 1], "left": [0, 10, 50], "top": [0, 5, 5],
             "width": [99, 30, 20], "height": [40, 10, 10], "conf": [-1, 91, 12], "text": ["", "a", "b"]}
        assert parse_tesseract_tsv(d, min_score=0.5) == words(("a", (10, 5, 40, 15), 0.91))

    def test_pages(self):
        text = tsv((5, 1, 1, 1, 1, 1, 0, 0, 5, 5, 90, "one"), (5, 2, 1, 1, 1, 1, 0, 0, 5, 5, 90, "two"))
        with pytest.raises(ValueError, match="2 pages.*page="):
            parse_tesseract_tsv(text)
        assert [w.text for w in parse_tesseract_tsv(text, page=1)] == ["two"]
        with pytest.raises(ValueError, match="page=2"):
            parse_tesseract_tsv(text, page=2)

    @pytest.mark.parametrize("bad, match", [
        ("level\tleft\n5\t3\n", "line 1: TSV header lacks"),
        (tsv((5, 1, 1, 1, 1, 1, 0, 0, 5, 5, "x", "w")), "line 2: conf"),
        (tsv((5, 1, 1, 1, 1, 1, 0, 0, 5, 5, 90, "w")).replace("\t90\tw", ""), "line 2: expected 12"),
        (tsv((5, 1, 1, 1, 1, 1, 0, 0, -5, 5, 90, "w")), "line 2: negative width"),
        (tsv((5, 1, 1, 1, 1, 1, 0, 0, 5, 5, 150, "w")), "line 2: conf.*outside"),
        (tsv(("five", 1, 1, 1, 1, 1, 0, 0, 5, 5, 90, "w")), "line 2: level"),
    ])
    def test_malformed(self, bad, match):
        with pytest.raises(ValueError, match=match):
            parse_tesseract_tsv(bad, source="page.tsv")

    def test_error_names_file(self, tmp_path):
        f = tmp_path / "bad.tsv"
        f.write_text(tsv((5, 1, 1, 1, 1, 1, 0, 0, 5, 5, "NaN", "w")))
        with pytest.raises(ValueError, match=r"bad\.tsv: line 2: conf"):
            read_ocr(f)


HOCR = """<?xml version="1.0" encoding="UTF-8"?>
<html xmlns="http://www.w3.org/1999/xhtml"><body>
 <div class='ocr_page' id='page_1' title='image "x.png"; bbox 0 0 500 120; ppageno 0'>
  <span class='ocr_line' title="bbox 23 36 374 60">
   <span class='ocrx_word' id='word_1_1' title='bbox 23 36 100 60; x_wconf 96'>Hello</span>
   <span class='ocrx_word' title='bbox 114 36 201 60; x_wconf 41'><strong>br<em>a</em>ve</strong></span>
   <span class='ocrx_word' title='bbox 216 42 278 60'>R&amp;D</span>
   <span class='ocrx_word' title='bbox 300 42 310 60; x_wconf 5'> </span>
  </span>
 </div>
</body></html>
"""


class TestHOCR:
    def test_words(self):
        assert parse_hocr(HOCR) == words(("Hello", (23, 36, 100, 60), 0.96),
                                         ("brave", (114, 36, 201, 60), 0.41),
                                         ("R&D", (216, 42, 278, 60), 1.0))

    def test_min_score(self):
        assert [w.text for w in parse_hocr(HOCR, min_score=0.5)] == ["Hello", "R&D"]

    def test_pages(self):
        two = HOCR.replace("</body>", "<div class='ocr_page'><span class='ocrx_word' "
                                      "title='bbox 1 2 3 4; x_wconf 50'>p2</span></div></body>")
        with pytest.raises(ValueError, match="2 pages"):
            parse_hocr(two)
        assert parse_hocr(two, page=1) == words(("p2", (1, 2, 3, 4), 0.5))

    @pytest.mark.parametrize("title, match", [
        ("x_wconf 50", "line 3: ocrx_word title 'x_wconf 50' has no bbox"),
        ("bbox 1 2 3", "line 3: .*bbox needs 4"),
        ("bbox 5 2 3 4", "line 3: .*x1 < x0"),
        ("bbox 1 2 3 4; x_wconf high", "line 3: .*x_wconf.*number"),
    ])
    def test_malformed(self, title, match):
        doc = f"<html><body>\n<p>\n<span class='ocrx_word' title='{title}'>w</span></p></body></html>"
        with pytest.raises(ValueError, match=match):
            parse_hocr(doc, source="p.hocr")

    def test_empty_self_closed_page(self):
        doc = ("<div class='ocr_page'/><div class='ocr_page'>"
               "<span class='ocrx_word' title='bbox 1 2 3 4'>w</span></div>")
        assert parse_hocr(doc, page=0) == [] and [w.text for w in parse_hocr(doc, page=1)] == ["w"]

    def test_unclosed_and_nested(self):
        with pytest.raises(ValueError, match="line 2: ocrx_word is never closed"):
            parse_hocr("<html>\n<span class='ocrx_word' title='bbox 1 2 3 4'>w")
        with pytest.raises(ValueError, match="nested"):
            parse_hocr("<span class='ocrx_word' title='bbox 1 2 3 4'><span class='ocrx_word'>")


PADDLE_V2 = [[  # one page, as ocr.ocr(img) returns it
    [[[10, 20], [110, 20], [110, 50], [10, 50]], ["Total due", 0.98]],
    [[[10, 60], [60, 60], [60, 90], [10, 90]], ["42", 0.30]],
]]
PADDLE_V3 = {"res": {"input_path": "x.png", "page_index": None, "dt_polys": [],
                     "rec_texts": ["Total due", "42"], "rec_scores": [0.98, 0.30],
                     "rec_polys": [[[10, 20], [110, 20], [110, 50], [10, 50]],
                                   [[10, 60], [60, 60], [60, 90], [10, 90]]],
                     "rec_boxes": [[10, 20, 110, 50], [10, 60, 60, 90]]}}
PADDLE_EXPECTED = [OCRWord("Total due", ((10.0, 20.0), (110.0, 20.0), (110.0, 50.0), (10.0, 50.0)), 0.98),
                   OCRWord("42", ((10.0, 60.0), (60.0, 60.0), (60.0, 90.0), (10.0, 90.0)), 0.30)]


class TestPaddle:
    @pytest.mark.parametrize("data", [PADDLE_V2, PADDLE_V2[0], PADDLE_V3, PADDLE_V3["res"], [PADDLE_V3]])
    def test_shapes(self, data):
        assert parse_paddleocr(data) == PADDLE_EXPECTED
        assert parse_paddleocr(json.dumps(data)) == PADDLE_EXPECTED

    def test_rec_boxes_only(self):
        res = {k: v for k, v in PADDLE_V3["res"].items() if k != "rec_polys"}
        assert parse_paddleocr(res, min_score=0.5) == words(("Total due", (10, 20, 110, 50), 0.98))

    def test_numpy_arrays(self):
        np = pytest.importorskip("numpy")
        res = dict(PADDLE_V3["res"], rec_scores=np.array([0.98, 0.30]),
                   rec_polys=np.array(PADDLE_V3["res"]["rec_polys"], dtype=np.int16))
        assert parse_paddleocr([res]) == PADDLE_EXPECTED

    def test_split_lines(self):
        # "Total due" is 9 characters over x 10..110: "Total" spans chars 0-5, "due" chars 6-9
        got = parse_paddleocr(PADDLE_V2, split_lines=True, min_score=0.5)
        x = lambda k: 10 + 100 * k / 9
        assert [w.text for w in got] == ["Total", "due"]
        assert flat(got[0].box) == pytest.approx(flat([(10, 20), (x(5), 20), (x(5), 50), (10, 50)]))
        assert flat(got[1].box) == pytest.approx(flat([(x(6), 20), (110, 20), (110, 50), (x(6), 50)]))

    def test_empty_pages_and_page_pick(self):
        assert parse_paddleocr([None]) == []
        assert parse_paddleocr([]) == []
        two = [PADDLE_V2[0], [[[[0, 0], [1, 0], [1, 1], [0, 1]], ["x", 0.9]]]]
        with pytest.raises(ValueError, match="2 pages"):
            parse_paddleocr(two)
        assert [w.text for w in parse_paddleocr(two, page=1)] == ["x"]

    @pytest.mark.parametrize("data, match", [
        ([[[[[0, 0], [1, 0], [1, 1]], ["x", 0.9]]]], r"\[0\]\[0\]: expected a PaddleOCR line"),
        ({"rec_texts": ["a", "b"], "rec_scores": [0.9], "rec_boxes": [[0, 0, 1, 1]] * 2}, "lengths differ"),
        ({"rec_texts": ["a"], "rec_scores": [1.5], "rec_boxes": [[0, 0, 1, 1]]}, r"rec_scores\[0\].*outside"),
        ({"rec_texts": ["a"], "rec_scores": [0.5], "rec_boxes": [[0, 0, 1]]}, r"rec_boxes\[0\]"),
        ({"rec_texts": ["a"], "rec_scores": [0.5]}, "rec_polys or rec_boxes"),
        ("[[1, 2", "line 1 column"),
    ])
    def test_malformed(self, data, match):
        with pytest.raises(ValueError, match=match):
            parse_paddleocr(data, source="p.json")


def doctr_doc(geometry=((0.1, 0.2), (0.3, 0.4)), confidence=0.87, dims=(200, 400)):
    word = {"value": "Invoice", "confidence": confidence, "geometry": geometry,
            "objectness_score": 0.9, "crop_orientation": {"value": 0, "confidence": None}}
    low = {"value": "no", "confidence": 0.2, "geometry": ((0.5, 0.5), (0.6, 0.55))}
    page = {"page_idx": 0, "dimensions": dims, "orientation": {"value": None, "confidence": None},
            "language": {"value": None, "confidence": None},
            "blocks": [{"geometry": ((0, 0), (1, 1)), "artefacts": [],
                        "lines": [{"geometry": ((0, 0), (1, 1)), "words": [word, low]}]}]}
    return {"pages": [page]}


class TestDocTR:
    def test_scaled_by_dimensions(self):
        # dimensions are (H, W) = (200, 400): x scales by 400, y by 200
        assert parse_doctr(doctr_doc()) == [OCRWord("Invoice", pytest.approx((40, 40, 120, 80)), 0.87),
                                            OCRWord("no", pytest.approx((200, 100, 240, 110)), 0.2)]
        assert [w.text for w in parse_doctr(json.dumps(doctr_doc()), min_score=0.5)] == ["Invoice"]

    def test_image_size_overrides(self):
        got = parse_doctr(doctr_doc(dims=None), image_size=(100, 1000), min_score=0.5)
        assert got[0].box == pytest.approx((100, 20, 300, 40))
        with pytest.raises(ValueError, match="image_size"):
            parse_doctr(doctr_doc(dims=None))

    def test_rotated_polygon(self):
        poly = ((0.1, 0.1), (0.2, 0.1), (0.2, 0.2), (0.1, 0.2))
        got = parse_doctr(doctr_doc(geometry=poly, dims=(10, 10)), min_score=0.5)
        assert flat(got[0].box) == pytest.approx(flat(((1, 1), (2, 1), (2, 2), (1, 2))))

    @pytest.mark.parametrize("doc, match", [
        (doctr_doc(geometry=((10, 20), (30, 40))), (r"pages\[0\]\.blocks\[0\]\.lines\[0\]\.words\[0\]"
                                                    r"\.geometry\[0\]: .*not a relative")),
        (doctr_doc(confidence="hi"), r"words\[0\]\.confidence"),
        (doctr_doc(geometry=((0.3, 0.2), (0.1, 0.4))), r"words\[0\]\.geometry: \(xmax"),
        ({"pages": [{"dimensions": (1, 1), "blocks": [{"lines": [{"words": [{"value": "x"}]}]}]}]},
         r"words\[0\]: missing field 'confidence'"),
        ({"page": []}, "not a docTR export"),
    ])
    def test_malformed(self, doc, match):
        with pytest.raises(ValueError, match=match):
            parse_doctr(doc)


class TestPlainJSON:
    def test_list_dict_and_jsonl(self):
        items = [{"text": "a", "box": [0, 0, 10, 10], "score": 0.9},
                 {"text": "b", "box": [[0, 0], [5, 0], [5, 5], [0, 5]]}]
        expected = [OCRWord("a", (0.0, 0.0, 10.0, 10.0), 0.9),
                    OCRWord("b", ((0.0, 0.0), (5.0, 0.0), (5.0, 5.0), (0.0, 5.0)), 1.0)]
        assert parse_words_json(json.dumps(items)) == expected
        assert parse_words_json(json.dumps({"words": items})) == expected
        assert parse_words_json("\n".join(json.dumps(i) for i in items) + "\n\n") == expected
        assert parse_words_json(json.dumps(items), min_score=0.95) == expected[1:]
        assert parse_words_json("") == []

    @pytest.mark.parametrize("text, match", [
        ('{"text": "a", "box": [0, 0, 1, 1]}\n{"text": "b"}\n', "line 2: missing field 'box'"),
        ('{"text": "a", "box": [0, 0, 1, 1]}\n{"text": \n', "line 2 column"),
        ('[{"text": "a", "box": [0, 0, 1, 1], "score": 7}]', r"\[0\]\.score.*outside \[0, 1\]"),
        ('{"words": [{"text": 3, "box": [0, 0, 1, 1]}]}', r"words\[0\]\.text: expected str"),
        ('[{"text": "a", "box": [0, 0, NaN, 1]}]', r"\[0\]\.box\[2\].*finite"),
        ('{"words": 5}', "expected a list"),
    ])
    def test_malformed(self, text, match):
        with pytest.raises(ValueError, match=match):
            parse_words_json(text, source="w.jsonl")


class TestReadOCR:
    @pytest.mark.parametrize("name, content, fmt", [
        ("a.tsv", TSV, "tesseract"),
        ("a.txt", TSV, "tesseract"),
        ("a.hocr", HOCR, "hocr"),
        ("a.html", HOCR, "hocr"),
        ("a.json", json.dumps(PADDLE_V2), "paddleocr"),
        ("a.json", json.dumps(PADDLE_V3), "paddleocr"),
        ("a.json", json.dumps(doctr_doc()), "doctr"),
        ("a.json", json.dumps([{"text": "a", "box": [0, 0, 1, 1]}]), "json"),
        ("a.json", '{"text": "a", "box": [0, 0, 1, 1]}\n{"text": "b", "box": [0, 0, 1, 1]}', "json"),
        ("a.jsonl", '{"text": "a", "box": [0, 0, 1, 1]}\n', "json"),
    ])
    def test_detect(self, tmp_path, name, content, fmt):
        f = tmp_path / name
        f.write_text(content)
        assert detect_format(f) == fmt
        assert read_ocr(f) == read_ocr(f, format=fmt)

    def test_args(self, tmp_path):
        f = tmp_path / "a.tsv"
        f.write_text(TSV)
        assert [w.text for w in read_ocr(f, min_score=0.9)] == ["Hello"]
        with pytest.raises(ValueError, match="min_score"):
            read_ocr(f, min_score=2)
        with pytest.raises(ValueError, match="format"):
            read_ocr(f, format="abbyy")
        with pytest.raises(ValueError, match="image_size"):
            read_ocr(f, image_size=(0, 5))
        with pytest.raises(FileNotFoundError, match="missing.tsv"):
            read_ocr(tmp_path / "missing.tsv")
        g = tmp_path / "junk.dat"
        g.write_text("hello there")
        with pytest.raises(ValueError, match="junk.dat: cannot detect"):
            read_ocr(g)
        b = tmp_path / "bin.tsv"
        b.write_bytes(b"\xff\xfe\x00")
        with pytest.raises(ValueError, match="bin.tsv: not UTF-8"):
            read_ocr(b)


def test_split_line_axis_aligned():
    # 'ab  c' has 5 characters over 0..50 (10 px each): 'ab' 0..20, 'c' 40..50
    assert split_line("ab  c", (0, 0, 50, 8), 0.5) == [OCRWord("ab", (0.0, 0.0, 20.0, 8.0), 0.5),
                                                     OCRWord("c", (40.0, 0.0, 50.0, 8.0), 0.5)]
    assert split_line("", (0, 0, 50, 8)) == [] and split_line("   ", (0, 0, 50, 8)) == []
