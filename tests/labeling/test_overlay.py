"""Overlay pictures, checked pixel by pixel on a hand-built grid over a white page."""

import pytest
import torch
from PIL import Image

from dvsft_kernels.labeling import GridView, OCRWord, VisualGrid
from dvsft_kernels.labeling.overlay import draw_overlay

IGN = -100
CELL = 20


def make_grid(rows=4, cols=6, newline=False):
    stride = cols + 1 if newline else cols
    view = GridView(sx=1.0, sy=1.0, ox=0.0, oy=0.0, rows=rows, cols=cols, cell_h=CELL, cell_w=CELL,
                    offset=0, row_stride=stride)
    return VisualGrid(family="hand", image_size=(rows * CELL, cols * CELL), views=(view,),
                      num_tokens=rows * stride)


def centre(r, c):
    return (c * CELL + CELL // 2, r * CELL + CELL // 2)


# word boxes in image pixels; "alpha" covers cells (0,0),(0,1); "beta" covers (2,3),(2,4)
WORDS = [OCRWord("alpha", (0, 0, 40, 20)), OCRWord("beta", (60, 40, 100, 60))]


def labels_for(grid, cells_ids, cols=6):
    lab = torch.full((grid.num_tokens,), IGN, dtype=torch.long)
    stride = grid.views[0].row_stride
    for (r, c), t in cells_ids.items():
        lab[r * stride + c] = t
    return lab


LABELED = {(0, 0): 7, (0, 1): 7, (2, 3): 9, (2, 4): 9}


def blend_alpha(fill, solid):
    """Alpha a such that fill = 255 * (1 - a) + solid * a on a white page, per channel; the channels
    must agree, which is what "the cell has the word's colour, semi-transparent" means."""
    alphas = [(255 - f) / (255 - s) for f, s in zip(fill, solid) if s < 200]
    assert alphas, f"word colour {solid} too light to test"
    assert max(alphas) - min(alphas) < 0.03, (fill, solid)
    return sum(alphas) / len(alphas)


def test_cells_take_their_word_colour(tmp_path):
    grid = make_grid()
    img = Image.new("RGB", (120, 80), "white")
    out_path = tmp_path / "ov.png"
    ret = draw_overlay(img, grid, labels_for(grid, LABELED), words=WORDS, path=out_path)
    png = Image.open(out_path)
    assert png.format == "PNG" and png.size == (120, 80)
    px = png.convert("RGB").load()
    assert ret.tobytes() == png.convert("RGB").tobytes()

    # word outlines are drawn solid on top: top edge midpoints
    solid_a, solid_b = px[20, 0], px[80, 40]
    assert solid_a != solid_b
    for (r, c), word_solid in [((0, 0), solid_a), ((0, 1), solid_a), ((2, 3), solid_b), ((2, 4), solid_b)]:
        a = blend_alpha(px[centre(r, c)], word_solid)
        assert 0.2 < a < 0.8  # semi-transparent
    assert px[centre(0, 0)] == px[centre(0, 1)]
    assert px[centre(2, 3)] == px[centre(2, 4)] != px[centre(0, 0)]
    # unlabeled cells keep the page colour at their centre; their outlines are drawn
    for r in range(4):
        for c in range(6):
            if (r, c) not in LABELED:
                assert px[centre(r, c)] == (255, 255, 255)
    assert px[CELL * 5, 70][0] < 255  # the vertical line between columns 4 and 5, row 3


def test_without_words_colour_follows_token_id():
    grid = make_grid()
    lab = labels_for(grid, {(0, 0): 5, (3, 5): 5, (1, 2): 6})
    px = draw_overlay(Image.new("RGB", (120, 80), "white"), grid, lab).load()
    assert px[centre(0, 0)] == px[centre(3, 5)] != (255, 255, 255)
    assert px[centre(1, 2)] not in (px[centre(0, 0)], (255, 255, 255))


class _Tok:
    def decode(self, ids):
        return {7: "WW", 9: "MM"}[ids[0]]


def test_token_text_drawn():
    grid = make_grid()
    img = Image.new("RGB", (120, 80), "white")
    lab = labels_for(grid, LABELED)
    plain = draw_overlay(img, grid, lab, words=WORDS)
    text = draw_overlay(img, grid, lab, words=WORDS, tokenizer=_Tok())

    def dark(im, r, c):
        x, y = c * CELL, r * CELL
        return sum(1 for i in range(x + 2, x + CELL - 2) for j in range(y + 2, y + CELL - 2)
                   if sum(im.getpixel((i, j))) < 150)

    assert dark(plain, 2, 3) == 0 and dark(text, 2, 3) > 5
    assert dark(text, 1, 1) == 0  # unlabeled cells get no text


def test_quad_word_boxes_and_path_image(tmp_path):
    grid = make_grid()
    src = tmp_path / "page.png"
    Image.new("RGB", (120, 80), "white").save(src)
    quad = [OCRWord("q", ((60, 40), (100, 40), (100, 60), (60, 60)))]
    px = draw_overlay(str(src), grid, labels_for(grid, {(2, 3): 3}), words=quad).load()
    assert px[80, 40] != (255, 255, 255)
    blend_alpha(px[centre(2, 3)], px[80, 40])


def test_errors():
    grid = make_grid()
    img = Image.new("RGB", (120, 80), "white")
    lab = labels_for(grid, LABELED)
    with pytest.raises(ValueError, match="image is 100x80"):
        draw_overlay(Image.new("RGB", (100, 80)), grid, lab)
    with pytest.raises(ValueError, match=r"labels must be .*\(24,\)"):
        draw_overlay(img, grid, lab[:-1])
    with pytest.raises(ValueError, match="labels must be"):
        draw_overlay(img, grid, lab.float())
    with pytest.raises(ValueError, match="grid must be"):
        draw_overlay(img, "grid", lab)
    with pytest.raises(ValueError, match="views"):
        draw_overlay(img, grid, lab, views=[1])
    with pytest.raises(FileNotFoundError, match="nope.png"):
        draw_overlay("nope.png", grid, lab)
    nl = make_grid(newline=True)  # token 6 is the newline after row 0
    bad = torch.full((nl.num_tokens,), IGN)
    bad[6] = 1
    with pytest.raises(ValueError, match=r"labels\[6\] = 1 .*not an image cell"):
        draw_overlay(img, nl, bad)


def test_multi_view_montage():
    # view 0: the whole 120 x 80 image at half scale, 20 px view cells = 40 px cells, 2 x 3;
    # view 1: the 20 px grid at scale 1, after view 0's 6 tokens
    coarse = GridView(sx=0.5, sy=0.5, ox=0.0, oy=0.0, rows=2, cols=3, cell_h=CELL, cell_w=CELL, offset=0,
                      row_stride=3, name="thumb")
    fine = GridView(sx=1.0, sy=1.0, ox=0.0, oy=0.0, rows=4, cols=6, cell_h=CELL, cell_w=CELL, offset=6,
                    row_stride=6, name="tile")
    grid = VisualGrid(family="hand", image_size=(80, 120), views=(coarse, fine), num_tokens=30)
    lab = torch.full((30,), IGN)
    lab[0] = 7  # coarse cell (0, 0): x 0..40, y 0..40
    lab[6 + 2 * 6 + 3] = 9  # fine cell (2, 3)
    img = Image.new("RGB", (120, 80), "white")
    out = draw_overlay(img, grid, lab, words=WORDS)
    cap = out.size[1] - 80  # montage: 2 panels side by side, each under a caption strip
    assert out.size == (240, 80 + cap) and cap > 0
    px = out.load()
    # panel 0 (thumb): its labeled 40 px cell is filled at its centre, the fine cell (2,3) is not
    assert px[20, cap + 20] != (255, 255, 255)
    assert px[centre(2, 3)[0], cap + centre(2, 3)[1]] == (255, 255, 255)
    # panel 1 (tile) sits at x + 120: the fine cell is filled, the thumb's cell area is not
    assert px[120 + centre(2, 3)[0], cap + centre(2, 3)[1]] != (255, 255, 255)
    assert px[120 + 30, cap + 30] == (255, 255, 255)
    # views=[1]: just that view, on one picture of the image's size
    one = draw_overlay(img, grid, lab, words=WORDS, views=[1])
    x, y = centre(2, 3)
    assert one.size == (120, 80) and one.getpixel((x, y)) == px[120 + x, cap + y]


def test_scale():
    grid = make_grid()
    img = Image.new("RGB", (120, 80), "white")
    lab = labels_for(grid, LABELED)
    one = draw_overlay(img, grid, lab, words=WORDS)
    two = draw_overlay(img, grid, lab, words=WORDS, scale=2)
    assert two.size == (240, 160)
    for r, c in LABELED:
        x, y = centre(r, c)
        assert two.getpixel((2 * x, 2 * y)) == one.getpixel((x, y)) != (255, 255, 255)
    assert two.getpixel((2 * centre(1, 1)[0], 2 * centre(1, 1)[1])) == (255, 255, 255)
    assert two.getpixel((160, 80)) == one.getpixel((80, 40))  # beta's outline, top edge
    with pytest.raises(ValueError, match="scale"):
        draw_overlay(img, grid, lab, scale=0)
