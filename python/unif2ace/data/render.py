"""Drawing one SynthFace image with Pillow.

Everything is drawn on a 128-unit canvas (scaled to the real canvas by ``u``), at twice the output
size (four times for 32 px) and box-reduced, which anti-aliases the edges for the price of one
``Image.reduce``. Colours and sizes are chosen so that each attribute value stays readable at 64 px:
eyes are cartoon-large (iris radius ≈ 1.6 px at 64 px), hair and hats carry a darker outline so their
silhouette survives against any background, thin brows are 0.75 px and thick ones 2.75 px.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

SKIN = {
    "fair": (241, 205, 180),
    "tan": (214, 160, 112),
    "brown": (158, 102, 66),
    "dark": (92, 58, 38),
}
HAIR = {
    "black": (28, 24, 22),
    "brown": (110, 64, 30),
    "blonde": (222, 188, 118),
    "red": (196, 72, 28),
    "grey": (178, 178, 182),
}
EYE = {"blue": (40, 110, 235), "green": (30, 165, 60), "brown": (122, 70, 24)}
BACKGROUND = {
    "blue": (120, 170, 232),
    "green": (140, 212, 140),
    "grey": (112, 112, 118),
    "pink": (240, 168, 205),
    "yellow": (250, 236, 60),
    "white": (250, 250, 250),
}
CLOTHING = {
    "red": (205, 38, 38),
    "blue": (38, 70, 195),
    "green": (36, 150, 60),
    "white": (242, 242, 242),
    "black": (30, 30, 30),
}
HAT_COLOURS = ((40, 52, 115), (125, 30, 42), (60, 90, 60), (95, 80, 70), (200, 120, 40))
MASK = {"surgical": (150, 205, 240), "black": (22, 22, 26)}
LIPSTICK = (205, 18, 48)
GOLD = (240, 196, 30)


def _mix(a, b, t):
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))


def _shade(c):
    """A contrasting shade for outlines and strands: darker for light colours, lighter for dark."""
    if sum(c) > 150:
        return _mix(c, (0, 0, 0), 0.42)
    return _mix(c, (255, 255, 255), 0.28)


def canvas_size(size: int) -> tuple[int, int]:
    """(canvas pixels, reduce factor) for an output ``size``."""
    factor = 4 if size < 64 else 2
    return size * factor, factor


def render(ident: dict, img: dict, size: int = 64) -> Image.Image:
    """Draw one face. ``ident`` holds identity geometry and identity attributes, ``img`` the
    image-level attributes and jitter (see :func:`unif2ace.data.synthface.sample_image`)."""
    S, factor = canvas_size(size)
    u = S / 128.0
    a = img["attrs"]
    im = Image.new("RGB", (S, S), BACKGROUND[a["background"]])
    d = ImageDraw.Draw(im)

    def box(x0, y0, x1, y1):
        return [x0 * u, y0 * u, x1 * u, y1 * u]

    def pts(p):
        return [(x * u, y * u) for x, y in p]

    def w(x):
        return max(1, int(round(x * u)))

    skin = SKIN[ident["skin_tone"]]
    hair = HAIR[ident["hair_colour"]]
    hair_dark = _shade(hair)
    cx = 64 + img["dx"]
    cy = 58 + img["dy"]
    fa, fb = ident["fa"], ident["fb"]  # face half-width, half-height
    top = cy - fb
    chin = cy + fb
    hairline = top + 9 + ident["hairline"]
    eye_y = cy - 3 + ident["eye_dy"]
    eye_dx = ident["eye_dx"]
    mouth_y = cy + 0.52 * fb + ident["mouth_dy"]
    length, style = a["hair_length"], img["hair_style_drawn"]
    expr = img["expression_drawn"]

    # shirt + shoulders
    d.ellipse(
        box(8, 100 + img["dy"] * 0.3, 120, 168),
        fill=CLOTHING[a["clothing"]],
        outline=_shade(CLOTHING[a["clothing"]]),
        width=w(1.5),
    )

    # back hair (shoulder-length / long): behind neck, ears and face
    if length in ("medium", "long"):
        bottom = chin + 6 if length == "medium" else 122
        x0, x1 = cx - fa - 9, cx + fa + 9
        if style == "straight":
            d.rounded_rectangle(
                box(x0, top - 7, x1, bottom),
                radius=16 * u,
                fill=hair,
                outline=hair_dark,
                width=w(1.5),
            )
            for k in (3, 6):
                d.line(
                    pts([(x0 + k, top + 20), (x0 + k, bottom - 3)]), fill=hair_dark, width=w(2.5)
                )
                d.line(
                    pts([(x1 - k, top + 20), (x1 - k, bottom - 3)]), fill=hair_dark, width=w(2.5)
                )
        else:
            amp, period = (3.5, 9.0) if style == "wavy" else (0.0, 1.0)
            if style == "wavy":
                n = 24
                left = [
                    (
                        x0 + amp * math.sin(2 * math.pi * i * (bottom - top) / n / period),
                        top + 12 + i * (bottom - top - 12) / n,
                    )
                    for i in range(n + 1)
                ]
                right = [
                    (
                        x1 - amp * math.sin(2 * math.pi * i * (bottom - top) / n / period),
                        top + 12 + i * (bottom - top - 12) / n,
                    )
                    for i in range(n + 1)
                ]
                poly = [(cx, top - 7)] + left + right[::-1]
                d.ellipse(box(x0, top - 7, x1, top + 30), fill=hair)
                d.polygon(pts(poly), fill=hair, outline=hair_dark)
                for k in (4, 8):
                    d.line(
                        pts(
                            [
                                (x0 + k + amp * math.sin(2 * math.pi * j / 4), top + 18 + j * 4)
                                for j in range(int((bottom - top - 22) / 4))
                            ]
                        ),
                        fill=hair_dark,
                        width=w(2.5),
                    )
                    d.line(
                        pts(
                            [
                                (x1 - k - amp * math.sin(2 * math.pi * j / 4), top + 18 + j * 4)
                                for j in range(int((bottom - top - 22) / 4))
                            ]
                        ),
                        fill=hair_dark,
                        width=w(2.5),
                    )
            else:  # curly: a mass of ringlets
                d.rounded_rectangle(
                    box(x0 + 3, top - 4, x1 - 3, bottom - 3), radius=14 * u, fill=hair
                )
                y = top + 4
                while y < bottom - 2:
                    for x in (x0 + 3, x0 + 9, x1 - 9, x1 - 3):
                        d.ellipse(
                            box(x - 4, y - 4, x + 4, y + 4),
                            fill=hair,
                            outline=hair_dark,
                            width=w(1.2),
                        )
                    y += 7

    # neck, ears, face
    d.rectangle(box(cx - 10, chin - 10, cx + 10, 108), fill=_mix(skin, (0, 0, 0), 0.12))
    for s in (-1, 1):
        ex = cx + s * (fa + 1)
        d.ellipse(box(ex - 5, cy - 9, ex + 5, cy + 8), fill=skin, outline=_shade(skin), width=w(1))
    face_box = box(cx - fa, top, cx + fa, chin)
    if ident["face_shape"] == "square":
        d.rounded_rectangle(face_box, radius=7 * u, fill=skin, outline=_shade(skin), width=w(1))
    else:
        d.ellipse(face_box, fill=skin, outline=_shade(skin), width=w(1))

    # beard (under the mouth, over the face)
    beard = a.get("beard")
    if beard == "stubble":
        col = _mix(skin, hair if ident["hair_colour"] != "grey" else (90, 90, 90), 0.45)
        d.chord(box(cx - fa + 1, mouth_y - 26, cx + fa - 1, chin), 0, 180, fill=col)
    elif beard == "full":
        d.chord(
            box(cx - fa - 1, cy - 22, cx + fa + 1, chin + 3),
            0,
            180,
            fill=hair,
            outline=hair_dark,
            width=w(1),
        )
    elif beard == "goatee":
        d.rounded_rectangle(
            box(cx - 7, mouth_y + 3, cx + 7, chin + 3),
            radius=4 * u,
            fill=hair,
            outline=hair_dark,
            width=w(1),
        )

    # eyes
    big = expr == "surprised"
    eh = 5.5 if big else 4.0
    for s in (-1, 1):
        ex = cx + s * eye_dx
        d.ellipse(
            box(ex - 6.5, eye_y - eh, ex + 6.5, eye_y + eh),
            fill=(250, 250, 250),
            outline=(40, 30, 30),
            width=w(1),
        )
        r = 3.4
        d.ellipse(box(ex - r, eye_y - r, ex + r, eye_y + r), fill=EYE[ident["eye_colour"]])
        d.ellipse(box(ex - 1.1, eye_y - 1.1, ex + 1.1, eye_y + 1.1), fill=(10, 10, 10))

    # eyebrows
    brow = _mix(hair, (0, 0, 0), 0.45) if ident["hair_colour"] != "grey" else (105, 105, 105)
    if ident["skin_tone"] in ("brown", "dark") and ident["hair_colour"] in ("black", "brown"):
        brow = (12, 8, 6)
    thick = ident["eyebrows"] == "thick"
    bw, bl = (5.5, 8.5) if thick else (1.5, 6.5)  # 2.75 px vs 0.75 px at 64 px
    by = eye_y - (12 if big else 8)
    for s in (-1, 1):
        ex = cx + s * eye_dx
        d.line(
            pts([(ex - bl, by + 1.5), (ex, by - 1), (ex + bl, by + 1.5)]),
            fill=brow,
            width=w(bw),
            joint="curve",
        )

    # nose
    nose_y = eye_y + ident["nose_len"]
    d.line(
        pts([(cx, eye_y + 3), (cx - 3, nose_y), (cx + 2, nose_y)]), fill=_shade(skin), width=w(1.5)
    )

    # moustache
    if a.get("moustache") == "yes":
        d.polygon(
            pts(
                [
                    (cx - 12, mouth_y - 1),
                    (cx - 5, mouth_y - 9),
                    (cx, mouth_y - 7.5),
                    (cx + 5, mouth_y - 9),
                    (cx + 12, mouth_y - 1),
                    (cx, mouth_y - 4),
                ]
            ),
            fill=hair if ident["hair_colour"] != "blonde" else _mix(hair, (0, 0, 0), 0.3),
            outline=hair_dark,
        )

    # mouth (not drawn under a mask)
    if a["mask"] == "none":
        red = a.get("lipstick") == "red"
        lip = LIPSTICK if red else _mix(skin, (70, 10, 20), 0.6)
        lw = 4.0 if red else 2.5
        mw = ident["mouth_w"]
        if expr == "neutral":
            d.line(pts([(cx - mw, mouth_y), (cx + mw, mouth_y)]), fill=lip, width=w(lw))
        elif expr == "smile":
            d.arc(
                box(cx - mw - 2, mouth_y - 10, cx + mw + 2, mouth_y + 5),
                15,
                165,
                fill=lip,
                width=w(lw),
            )
        elif expr == "laugh":
            d.chord(
                box(cx - mw - 3, mouth_y - 9, cx + mw + 3, mouth_y + 11),
                0,
                180,
                fill=(95, 18, 30),
                outline=lip,
                width=w(lw * 0.8),
            )
            d.rectangle(
                box(cx - mw + 1, mouth_y + 0.5, cx + mw - 1, mouth_y + 3), fill=(250, 250, 250)
            )
        else:  # surprised: a round "O"
            d.ellipse(
                box(cx - 4.5, mouth_y - 4, cx + 4.5, mouth_y + 8),
                fill=(95, 18, 30),
                outline=lip,
                width=w(lw * 0.8),
            )
    else:
        col = MASK[a["mask"]]
        d.rounded_rectangle(
            box(cx - fa + 1, eye_y + 7, cx + fa - 1, chin + 1),
            radius=9 * u,
            fill=col,
            outline=_shade(col),
            width=w(1),
        )
        for k in (0, 1, 2):
            yy = eye_y + 14 + k * 6
            d.line(pts([(cx - fa + 5, yy), (cx + fa - 5, yy)]), fill=_shade(col), width=w(1))
        for s in (-1, 1):
            d.line(
                pts([(cx + s * (fa - 1), eye_y + 9), (cx + s * (fa + 2), cy - 2)]),
                fill=_shade(col),
                width=w(1),
            )

    # hair on top of the head
    if length != "bald":
        cap = box(cx - fa - 3, top - 7, cx + fa + 3, 2 * hairline - (top - 7))
        d.chord(cap, 180, 360, fill=hair, outline=hair_dark, width=w(1.5))
        for s in (-1, 1):  # temples: what tells short hair from a bald head under a hat
            x_in, x_out = cx + s * (fa - 4), cx + s * (fa + 2)
            d.polygon(
                pts(
                    [
                        (x_out, hairline - 2),
                        (x_in, hairline - 2),
                        (x_in, eye_y - 6),
                        (x_out, eye_y + 1),
                    ]
                ),
                fill=hair,
            )
        if style == "straight":
            d.line(pts([(cx + 6, top - 5), (cx + 4, hairline)]), fill=hair_dark, width=w(2.5))
            for k in (-14, 14):
                d.line(
                    pts([(cx + k, top - 3), (cx + k * 1.25, hairline - 2)]),
                    fill=hair_dark,
                    width=w(1.2),
                )
        elif style == "wavy":
            for yy in (top - 1, top + 5):
                d.line(
                    pts(
                        [
                            (cx - fa + 2 + i * 3, yy + 2 * math.sin(i * 1.6))
                            for i in range(int((2 * fa - 4) / 3) + 1)
                        ]
                    ),
                    fill=hair_dark,
                    width=w(2.5),
                )
        elif style == "curly":
            for i in range(9):
                t = math.pi * (0.06 + 0.88 * i / 8)
                x = cx - math.cos(t) * (fa + 1)
                y = hairline - math.sin(t) * (hairline - top + 5)
                d.ellipse(
                    box(x - 4.5, y - 4.5, x + 4.5, y + 4.5),
                    fill=hair,
                    outline=hair_dark,
                    width=w(1.2),
                )

    # bangs
    if a["bangs"] == "yes":
        yb = max(by - 4, hairline + 3)
        if style == "curly":
            for x in range(int(cx - fa + 6), int(cx + fa - 3), 6):
                d.ellipse(
                    box(x - 4, hairline - 3, x + 4, yb + 1),
                    fill=hair,
                    outline=hair_dark,
                    width=w(1),
                )
        else:
            d.rectangle(
                box(cx - fa + 3, hairline - 3, cx + fa - 3, max(yb - 2, hairline - 3)), fill=hair
            )
            n = 7
            zig = [
                (cx - fa + 3 + i * (2 * fa - 6) / n, yb + (1.5 if i % 2 else -2))
                for i in range(n + 1)
            ]
            d.polygon(
                pts([(cx - fa + 3, hairline - 3)] + zig + [(cx + fa - 3, hairline - 3)]),
                fill=hair,
                outline=hair_dark,
            )

    # earrings
    if a["earrings"] == "hoops":
        for s in (-1, 1):
            ex = cx + s * (fa + 1)
            d.ellipse(box(ex - 3.5, cy + 6, ex + 3.5, cy + 13), outline=GOLD, width=w(2))

    # glasses
    g = a["glasses"]
    frame = (25, 25, 30)
    if g != "none":
        for s in (-1, 1):
            ex = cx + s * eye_dx
            if g == "round":
                d.ellipse(box(ex - 8, eye_y - 8, ex + 8, eye_y + 8), outline=frame, width=w(2.5))
            elif g == "square":
                d.rectangle(box(ex - 9, eye_y - 7, ex + 9, eye_y + 7), outline=frame, width=w(2.5))
            else:
                d.rounded_rectangle(
                    box(ex - 9, eye_y - 6.5, ex + 9, eye_y + 6), radius=3 * u, fill=(18, 18, 28)
                )
            d.line(
                pts([(ex + s * 8, eye_y - 2), (cx + s * (fa + 1), eye_y - 3)]),
                fill=frame,
                width=w(1.5),
            )
        d.line(
            pts([(cx - eye_dx + 8, eye_y - 2), (cx + eye_dx - 8, eye_y - 2)]),
            fill=frame,
            width=w(1.5),
        )

    # hat
    h = a["hat"]
    if h != "none":
        hc = HAT_COLOURS[img["hat_colour"]]
        hd = _shade(hc)
        if h == "cap":
            d.chord(
                box(cx - fa - 3, top - 12, cx + fa + 3, 2 * hairline - top + 8),
                180,
                360,
                fill=hc,
                outline=hd,
                width=w(1.5),
            )
            d.rounded_rectangle(
                box(cx - fa - 2, hairline - 4, cx + fa + 16, hairline + 1),
                radius=2 * u,
                fill=hc,
                outline=hd,
                width=w(1),
            )
            d.ellipse(box(cx - 2, top - 13, cx + 2, top - 9), fill=hd)
        elif h == "beanie":
            d.chord(
                box(cx - fa - 4, top - 14, cx + fa + 4, 2 * hairline - top + 14),
                180,
                360,
                fill=hc,
                outline=hd,
                width=w(1.5),
            )
            d.rectangle(
                box(cx - fa - 4, hairline - 7, cx + fa + 4, hairline + 1),
                fill=_mix(hc, (255, 255, 255), 0.35),
                outline=hd,
                width=w(1),
            )
            for x in range(int(cx - fa), int(cx + fa) + 1, 5):
                d.line(pts([(x, hairline - 6), (x, hairline)]), fill=hd, width=w(1))
            d.ellipse(
                box(cx - 5, top - 22, cx + 5, top - 12),
                fill=_mix(hc, (255, 255, 255), 0.5),
                outline=hd,
                width=w(1),
            )
        else:  # fedora: wide brim, tall crown with a band
            d.polygon(
                pts(
                    [
                        (cx - fa + 2, hairline - 5),
                        (cx - fa + 5, top - 18),
                        (cx, top - 14),
                        (cx + fa - 5, top - 18),
                        (cx + fa - 2, hairline - 5),
                    ]
                ),
                fill=hc,
                outline=hd,
            )
            d.rectangle(
                box(cx - fa + 3, hairline - 10, cx + fa - 3, hairline - 6), fill=(20, 20, 20)
            )
            d.ellipse(
                box(cx - fa - 16, hairline - 8, cx + fa + 16, hairline + 1),
                fill=hc,
                outline=hd,
                width=w(1.5),
            )

    return im.reduce(factor)
