"""Render lines of words as images for the OCR chain's tests, with where each word is.

    python3 render_text.py OUT_DIR [COUNT] [SEED]

Writes OUT_DIR/NNN.png and OUT_DIR/truth.json: per image, its words with their boxes
(axis-aligned, in the final image's pixels). Each image holds one to three lines of two to
four words, black on white, in one of Debian's fonts-dejavu-core faces at 24 to 40 px, turned
by up to 5 degrees either way, and every fourth image also upside down (180 degrees). Seeded:
the same arguments give the same images. Needs Pillow.
"""

import json
import math
import os
import random
import sys

from PIL import Image, ImageDraw, ImageFont

FONTS = "/usr/share/fonts/truetype/dejavu"
FACES = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf"]
WORDS = (
    "meter reads gate north south water level pump station valve open closed alarm "
    "battery power line voltage current sensor camera door front back room kitchen "
    "garage motor speed fault normal check service filter pressure flow total daily "
    "energy solar panel tank zone left right upper lower main spare test unit"
).split()


def word(rng):
    if rng.random() < 0.25:
        return str(rng.randint(10, 99999))
    w = rng.choice(WORDS)
    return w.capitalize() if rng.random() < 0.3 else w


def render(rng):
    face = rng.choice(FACES)
    size = rng.randint(24, 40)
    font = ImageFont.truetype(os.path.join(FONTS, face), size)
    lines = [[word(rng) for _ in range(rng.randint(2, 4))] for _ in range(rng.randint(1, 3))]
    margin, gap = 40, int(size * 0.9)
    space = font.getlength(" ")
    widths = [sum(font.getlength(w) for w in ws) + space * (len(ws) - 1) for ws in lines]
    width = int(max(widths)) + 2 * margin
    asc, desc = font.getmetrics()
    height = len(lines) * (asc + desc) + (len(lines) - 1) * gap + 2 * margin
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    words = []
    y = margin
    for ws in lines:
        x = margin
        for w in ws:
            draw.text((x, y), w, font=font, fill="black")
            l, t, r, b = draw.textbbox((x, y), w, font=font)
            words.append({"text": w, "box": [l, t, r, b]})
            x += font.getlength(w) + space
        y += asc + desc + gap
    angle = rng.uniform(-5, 5)
    turned = img.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor="white")
    # Where each corner went: Pillow turns counter-clockwise about the centre, then expands.
    cx, cy = width / 2, height / 2
    ncx, ncy = turned.width / 2, turned.height / 2
    a = math.radians(angle)

    def move(px, py):
        dx, dy = px - cx, py - cy
        return (ncx + dx * math.cos(a) + dy * math.sin(a), ncy - dx * math.sin(a) + dy * math.cos(a))

    flip = rng.random() < 0.25
    for w in words:
        l, t, r, b = w["box"]
        pts = [move(px, py) for px, py in ((l, t), (r, t), (l, b), (r, b))]
        if flip:
            pts = [(turned.width - px, turned.height - py) for px, py in pts]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        w["box"] = [round(min(xs), 1), round(min(ys), 1), round(max(xs), 1), round(max(ys), 1)]
    if flip:
        turned = turned.rotate(180)
    return turned, {"font": face, "size": size, "angle": round(angle, 2), "flipped": flip,
                    "words": words}


def main():
    out = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 24
    rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 7)
    os.makedirs(out, exist_ok=True)
    truth = {}
    for i in range(count):
        img, t = render(rng)
        name = "%03d.png" % i
        img.save(os.path.join(out, name))
        truth[name] = t
    with open(os.path.join(out, "truth.json"), "w") as f:
        json.dump(truth, f, indent=1)


if __name__ == "__main__":
    main()
