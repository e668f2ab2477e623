"""divergen.data: LVIS-format dataset, transforms, samplers, loaders, on tiny datasets made in tmp_path."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from divergen.data import (
    AspectRatioGroupedBatchSampler,
    CategoryInfo,
    Compose,
    DetectionDataset,
    Geometry,
    InferenceSampler,
    RandomFlip,
    RepeatFactorSampler,
    ResizeCrop,
    ResizeShortestEdge,
    apply_boxes,
    apply_image,
    build_test_loader,
    build_train_loader,
    collate,
    decode_masks,
    load_category_info,
    lvis_image_path,
    repeat_factors,
    train_transform,
)

RED, GREEN, GREY = (230, 20, 20), (20, 200, 40), (90, 90, 90)


# ------------------------------------------------------------------------------------------------ helpers


def rect_polygon(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def write_lvis(root: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def image_record(image_id: int, h: int, w: int, split: str = "train2017") -> dict:
    return {
        "id": image_id,
        "height": h,
        "width": w,
        "coco_url": f"http://x/{split}/{image_id:012d}.png",
        "neg_category_ids": [],
        "not_exhaustive_category_ids": [],
    }


def save_image(root: Path, record: dict, pixels: np.ndarray) -> Path:
    path = lvis_image_path(record, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def scene(h: int, w: int, rects: list[tuple[tuple[int, int, int, int], tuple[int, int, int]]]) -> np.ndarray:
    """A grey image with solid rectangles (x0, y0, x1, y1), pixel edges on integer coordinates."""
    pixels = np.full((h, w, 3), GREY, dtype=np.uint8)
    for (x0, y0, x1, y1), color in rects:
        pixels[y0:y1, x0:x1] = color
    return pixels


@pytest.fixture()
def rect_dataset(tmp_path):
    """Two images (one wide, one tall), a red (category 5) and a green (category 9) rectangle on each."""
    images, anns = [], []
    specs = {
        1: (120, 160, [(20, 30, 100, 90), (110, 10, 150, 110)]),
        2: (150, 100, [(10, 10, 60, 50), (30, 70, 90, 140)]),
    }
    for image_id, (h, w, rects) in specs.items():
        rec = image_record(image_id, h, w)
        images.append(rec)
        save_image(tmp_path, rec, scene(h, w, list(zip(rects, (RED, GREEN), strict=True))))
        for k, (x0, y0, x1, y1) in enumerate(rects):
            anns.append(
                {
                    "id": 10 * image_id + k,
                    "image_id": image_id,
                    "category_id": (5, 9)[k],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "segmentation": [rect_polygon(x0, y0, x1, y1)],
                }
            )
    cats = [{"id": 9, "name": "green"}, {"id": 5, "name": "red"}]
    return write_lvis(tmp_path, images, anns, cats), tmp_path


def dilate(mask: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.max_pool2d(mask[None].float(), 3, stride=1, padding=1)[0].bool()


def erode(mask: torch.Tensor) -> torch.Tensor:
    """3x3 erosion; outside the image counts as background (the crop edge is a mask edge too)."""
    outside = torch.nn.functional.pad((~mask)[None].float(), (1, 1, 1, 1), value=1.0)
    return ~torch.nn.functional.max_pool2d(outside, 3, stride=1)[0].bool()


def tight_box(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = mask.nonzero(as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


# ------------------------------------------------------------------------------------------ paths, categories


def test_lvis_image_path():
    assert lvis_image_path(
        {"coco_url": "http://images.cocodataset.org/train2017/000000000139.jpg"}, "/d/coco"
    ) == Path("/d/coco/train2017/000000000139.jpg")
    assert lvis_image_path({"coco_url": "http://a/val2017/1.jpg", "file_name": "x/1.jpg"}, "/r") == Path(
        "/r/x/1.jpg"
    )
    with pytest.raises(ValueError, match="image id 7"):
        lvis_image_path({"id": 7}, "/r")


def test_category_info_counts_and_frequency(tmp_path):
    # Category id -> number of images containing it; the file's own image_count fields are deliberately wrong.
    per_cat_images = {40: 0, 3: 1, 20: 10, 7: 11, 30: 100, 50: 101}
    images = [image_record(i, 10, 10) for i in range(1, 102)]
    anns, next_id = [], 1
    for cid, n in per_cat_images.items():
        for image_id in range(1, n + 1):
            anns.append({"id": next_id, "image_id": image_id, "category_id": cid, "bbox": [0, 0, 1, 1]})
            next_id += 1
    # A second instance in an image counts for instances only; a crowd annotation counts for neither.
    anns.append({"id": next_id, "image_id": 1, "category_id": 3, "bbox": [0, 0, 2, 2]})
    anns.append({"id": next_id + 1, "image_id": 2, "category_id": 3, "bbox": [0, 0, 2, 2], "iscrowd": 1})
    cats = [{"id": c, "name": f"c{c}", "image_count": 999, "frequency": "f"} for c in per_cat_images]
    info = load_category_info(write_lvis(tmp_path, images, anns, cats))
    assert info.ids == (3, 7, 20, 30, 40, 50)
    assert info.names == ("c3", "c7", "c20", "c30", "c40", "c50")
    assert info.image_count == (1, 11, 10, 100, 0, 101)
    assert info.instance_count == (2, 11, 10, 100, 0, 101)
    assert info.frequency == ("r", "c", "r", "c", "r", "f")  # 0 images -> "r" (documented choice)
    assert info.id_to_index[30] == 3 and info.ids[3] == 30 and info.num_classes == 6
    data = json.loads((tmp_path / "annotations.json").read_text())
    assert CategoryInfo.from_annotations(data).image_count == info.image_count


def test_unknown_category_names_annotation_image_and_file(rect_dataset):
    json_path, root = rect_dataset
    data = json.loads(json_path.read_text())
    data["annotations"].append(
        {
            "id": 4242,
            "image_id": 2,
            "category_id": 777,
            "bbox": [0, 0, 5, 5],
            "segmentation": [rect_polygon(0, 0, 5, 5)],
        }
    )
    json_path.write_text(json.dumps(data))
    for build in (
        lambda: load_category_info(json_path),
        lambda: DetectionDataset(json_path, root, transform=None, filter_empty=True),
    ):
        with pytest.raises(ValueError) as e:
            build()
        assert "annotation id 4242" in str(e.value) and "image id 2" in str(e.value)
        assert str(json_path) in str(e.value) and "777" in str(e.value)


# ------------------------------------------------------------------------------------------------ dataset


def test_item_fields_labels_and_identity_geometry(rect_dataset):
    json_path, root = rect_dataset
    ds = DetectionDataset(json_path, root, transform=None, filter_empty=True)
    assert len(ds) == 2 and ds.categories.ids == (5, 9)
    item = ds[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 120, 160)
    assert item["boxes"].dtype == torch.float32
    assert item["boxes"].tolist() == [[20, 30, 100, 90], [110, 10, 150, 110]]  # xywh -> xyxy
    assert item["labels"].tolist() == [0, 1]  # id 5 -> 0, id 9 -> 1 (sorted ids)
    assert item["masks"].dtype == torch.bool and item["masks"].shape == (2, 120, 160)
    assert item["image_id"] == 1 and item["orig_size"] == (120, 160) and item["scale"] == (1.0, 1.0)
    assert item["file_name"].endswith("train2017/000000000001.png")
    # The red rectangle's pixels are exactly its mask.
    red = (item["image"].permute(1, 2, 0) == torch.tensor(RED, dtype=torch.uint8)).all(-1)
    assert torch.equal(red, item["masks"][0])
    assert ds.image_categories == [[0, 1], [0, 1]] and ds.is_wide.tolist() == [True, False]


def test_polygon_and_rle_masks_decode(tmp_path):
    h, w = 40, 60
    rng = np.random.default_rng(0)
    blob = np.zeros((h, w), dtype=np.uint8)
    blob[5:30, 10:25] = rng.random((25, 15)) > 0.3
    blob[12, 11] = 1
    rle = mask_utils.encode(np.asfortranarray(blob))
    compressed = {"size": [h, w], "counts": rle["counts"].decode()}
    # Uncompressed RLE: run lengths over the column-major flattening, starting with zeros.
    flat = blob.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        counts = [0, *counts]
    uncompressed = {"size": [h, w], "counts": counts}
    triangle = [[30.0, 5.0, 55.0, 10.0, 40.0, 35.0]]
    rec = image_record(1, h, w)
    save_image(tmp_path, rec, np.zeros((h, w, 3), dtype=np.uint8))
    anns = [
        {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "segmentation": s}
        for i, s in enumerate([compressed, uncompressed, triangle])
    ]
    ds = DetectionDataset(
        write_lvis(tmp_path, [rec], anns, [{"id": 1}]), tmp_path, transform=None, filter_empty=True
    )
    masks = ds[0]["masks"].numpy()
    assert masks[0].sum() > 100 and (masks[0] == blob.astype(bool)).all()
    assert (masks[1] == blob.astype(bool)).all()
    ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(triangle, h, w))).astype(bool)
    assert ref.sum() > 200 and (masks[2] == ref).all()
    anns[0]["segmentation"] = {"size": [w, h], "counts": compressed["counts"]}
    with pytest.raises(ValueError, match=r"annotation id 1: RLE size \[60, 40\] != .* \[40, 60\]"):
        DetectionDataset(
            write_lvis(tmp_path, [rec], anns, [{"id": 1}]), tmp_path, transform=None, filter_empty=True
        )


def test_invalid_polygons_dropped_and_counted(tmp_path):
    rec = image_record(1, 20, 20)
    save_image(tmp_path, rec, np.zeros((20, 20, 3), dtype=np.uint8))
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "segmentation": [[0, 0, 5, 5]]},
        {
            "id": 2,
            "image_id": 1,
            "category_id": 1,
            "bbox": [0, 0, 5, 5],
            "segmentation": [[1, 1], rect_polygon(0, 0, 5, 5)],
        },
    ]
    ds = DetectionDataset(
        write_lvis(tmp_path, [rec], anns, [{"id": 1}]), tmp_path, transform=None, filter_empty=True
    )
    assert ds.num_invalid_segmentations == 1 and len(ds[0]["labels"]) == 1
    del anns[0]["segmentation"]
    with pytest.raises(ValueError, match="annotation id 1 .*no 'segmentation'"):
        DetectionDataset(
            write_lvis(tmp_path, [rec], anns, [{"id": 1}]), tmp_path, transform=None, filter_empty=True
        )


def test_crowd_ignored_and_filter_empty(tmp_path):
    images = [image_record(i, 20, 30) for i in (1, 2, 3)]
    for rec in images:
        save_image(tmp_path, rec, np.zeros((20, 30, 3), dtype=np.uint8))
    seg = [rect_polygon(2, 2, 8, 8)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 6, 6], "segmentation": seg},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "segmentation": seg, "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 20, 20], "segmentation": seg, "iscrowd": 1},
    ]
    json_path = write_lvis(tmp_path, images, anns, [{"id": 1}])
    train = DetectionDataset(json_path, tmp_path, transform=None, filter_empty=True)
    assert len(train) == 1 and train[0]["boxes"].tolist() == [[2, 2, 8, 8]]  # image 2 had only a crowd box
    test = DetectionDataset(json_path, tmp_path, transform=None, filter_empty=False, load_masks=False)
    assert [test.record(i)["id"] for i in range(len(test))] == [1, 2, 3]
    assert len(test[1]["boxes"]) == 0 and test[2]["boxes"].shape == (0, 4) and "masks" not in test[2]


def test_missing_and_corrupt_images_skipped_and_counted(tmp_path, caplog):
    images = [image_record(i, 20, 30) for i in (1, 2, 3, 4, 5)]
    save_image(tmp_path, images[0], np.zeros((20, 30, 3), dtype=np.uint8))  # good
    # 2: missing; 3: not an image; 4: truncated PNG; 5: decodes, but not at the annotated size.
    lvis_image_path(images[2], tmp_path).write_bytes(b"definitely not a png")
    good = save_image(tmp_path, images[3], np.full((20, 30, 3), 7, dtype=np.uint8)).read_bytes()
    lvis_image_path(images[3], tmp_path).write_bytes(good[: len(good) // 2])
    save_image(tmp_path, images[4], np.zeros((30, 20, 3), dtype=np.uint8))
    anns = [
        {
            "id": i,
            "image_id": i,
            "category_id": 1,
            "bbox": [1, 1, 5, 5],
            "segmentation": [rect_polygon(1, 1, 6, 6)],
        }
        for i in (1, 2, 3, 4, 5)
    ]
    ds = DetectionDataset(
        write_lvis(tmp_path, images, anns, [{"id": 1}]), tmp_path, transform=None, filter_empty=True
    )
    with caplog.at_level(logging.WARNING, logger="divergen.data"):
        items = [ds[i] for i in range(5)]
    assert items[0] is not None and items[1:] == [None] * 4 and ds.num_skipped == 4
    for rec in images[1:]:
        assert str(lvis_image_path(rec, tmp_path)) in caplog.text
    assert "decoded size 30x20 != annotated 20x30" in caplog.text
    # Through worker processes: batches lose the bad samples, the count is visible here.
    loader = build_test_loader(ds, batch_size=5, num_workers=2)
    images_, targets, infos = next(iter(loader))
    assert len(images_) == len(targets) == 1 and infos[0]["image_id"] == 1 and ds.num_skipped == 8


def test_collate_keeps_sizes_and_drops_none(rect_dataset):
    json_path, root = rect_dataset
    ds = DetectionDataset(json_path, root, transform=None, filter_empty=True)
    images, targets, infos = collate([ds[0], None, ds[1]])
    assert [im.shape for im in images] == [(3, 120, 160), (3, 150, 100)]
    assert [set(t) for t in targets] == [{"boxes", "labels", "masks"}] * 2
    assert [i["image_id"] for i in infos] == [1, 2] and infos[1]["orig_size"] == (150, 100)
    assert collate([None]) == ([], [], [])


# ------------------------------------------------------------------------------------------------ transforms


def efficientdet_resize_crop_reference(h, w, size, scale_range, rng):
    """The official EfficientDetResizeCrop.get_transform, transcribed (np.random.uniform -> rng.uniform)."""
    scale_factor = rng.uniform(*scale_range)
    img_scale = min(scale_factor * size / h, scale_factor * size / w)
    scaled_h, scaled_w = int(h * img_scale), int(w * img_scale)
    offset_y = int(max(0.0, float(scaled_h - size)) * rng.uniform(0, 1))
    offset_x = int(max(0.0, float(scaled_w - size)) * rng.uniform(0, 1))
    return scaled_h, scaled_w, offset_y, offset_x, img_scale


@pytest.mark.parametrize("h,w", [(120, 160), (150, 100), (64, 64)])
def test_resize_crop_geometry_matches_official(h, w):
    crops = 0
    for seed in range(40):
        g = ResizeCrop(size=96, scale_range=(0.1, 2.0))(Geometry.identity(h, w), np.random.default_rng(seed))
        sh, sw, oy, ox, s = efficientdet_resize_crop_reference(
            h, w, 96, (0.1, 2.0), np.random.default_rng(seed)
        )
        assert g.resized == (sh, sw) and g.offset == (oy, ox) and g.scale == (s, s)
        # The official image crop [oy : min(sh, oy + S)]: at most S, no padding.
        assert g.out_size == (min(sh, oy + 96) - oy, min(sw, ox + 96) - ox)
        crops += max(sh, sw) > 96
    assert crops > 5  # the seeds exercise the crop branch


def test_apply_image_matches_resize_then_crop_then_flip():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    for seed in range(10):
        g = train_transform(64)(Geometry.identity(50, 70), np.random.default_rng(seed))
        (rh, rw), (oy, ox), (oh, ow) = g.resized, g.offset, g.out_size
        ref = np.asarray(Image.fromarray(pixels).resize((rw, rh), Image.Resampling.BILINEAR))[
            oy : oy + oh, ox : ox + ow
        ]
        ref = ref[:, ::-1] if g.flip else ref
        assert torch.equal(
            apply_image(Image.fromarray(pixels), g), torch.from_numpy(ref.copy()).permute(2, 0, 1)
        )


def test_train_transform_keeps_pixels_boxes_and_masks_aligned(rect_dataset):
    """A solid rectangle through resize/crop/flip: box, mask and coloured pixels agree."""
    json_path, root = rect_dataset
    ds = DetectionDataset(json_path, root, transform=train_transform(96), filter_empty=True)
    checked, dropped = 0, 0
    for seed in range(60):
        item = ds[(seed % 2, seed)]
        dropped += 2 - len(item["labels"])
        h, w = item["image"].shape[1:]
        assert h <= 96 and w <= 96 and item["masks"].shape == (len(item["labels"]), h, w)
        for box, mask, label in zip(item["boxes"], item["masks"], item["labels"], strict=True):
            assert (box[2:] <= torch.tensor([w, h])).all() and (box[:2] >= 0).all()
            if mask.sum() < 30:
                continue  # a sliver at the crop edge: nothing meaningful to compare
            assert (tight_box(mask) - box).abs().max() <= 1.0, (seed, box, tight_box(mask))
            color = torch.tensor((RED, GREEN)[int(label)], dtype=torch.uint8)
            painted = (item["image"].permute(1, 2, 0).int() - color.int()).abs().max(-1).values < 40
            # Up to the 1-px border that bilinear resizing blends: mask interior painted, paint in the mask.
            assert (erode(mask) <= painted).all() and (painted <= dilate(mask)).all(), seed
            checked += 1
    assert checked > 40 and dropped > 0  # some crops lose an instance, and it is dropped, not kept empty


def test_flip_consistency(rect_dataset):
    json_path, root = rect_dataset
    plain = DetectionDataset(json_path, root, transform=None, filter_empty=True)[0]
    flipped = DetectionDataset(json_path, root, transform=Compose(RandomFlip(p=1.0)), filter_empty=True)[0]
    w = plain["image"].shape[-1]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))
    b = plain["boxes"]
    assert torch.equal(flipped["boxes"], torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1))
    never = DetectionDataset(json_path, root, transform=Compose(RandomFlip(p=0.0)), filter_empty=True)[0]
    assert torch.equal(never["image"], plain["image"])
    rng = np.random.default_rng(0)
    flips = [RandomFlip(p=0.5)(Geometry.identity(4, 4), rng).flip for _ in range(400)]
    assert 150 < sum(flips) < 250


@pytest.mark.parametrize(
    "hw,expected",
    [
        ((480, 640), (800, 1067)),
        ((640, 480), (1067, 800)),
        ((100, 2000), (67, 1333)),
        ((800, 800), (800, 800)),
        ((427, 640), (800, 1199)),
        ((1000, 1500), (800, 1200)),
    ],
)
def test_resize_shortest_edge_sizes(hw, expected):
    g = ResizeShortestEdge(short_edge=800, max_size=1333)(Geometry.identity(*hw))
    assert g.out_size == g.resized == expected and g.offset == (0, 0) and not g.flip
    assert g.scale == (expected[0] / hw[0], expected[1] / hw[1])
    box = apply_boxes(torch.tensor([[0.0, 0.0, hw[1], hw[0]]]), g)
    assert torch.equal(box, torch.tensor([[0.0, 0.0, expected[1], expected[0]]]))


def test_transforms_must_come_first():
    g = ResizeShortestEdge()(Geometry.identity(10, 20))
    with pytest.raises(ValueError, match="must be the first transform"):
        ResizeCrop(size=64)(g, np.random.default_rng(0))


def test_rle_masks_match_pil_nearest_resize_and_crop():
    rng = np.random.default_rng(2)
    h, w = 53, 71
    mask = rng.random((h, w)) > 0.5
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    for seed in range(25):
        g = train_transform(48)(Geometry.identity(h, w), np.random.default_rng(seed))
        (rh, rw), (oy, ox), (oh, ow) = g.resized, g.offset, g.out_size
        ref = np.asarray(
            Image.fromarray(mask.astype(np.uint8)).resize((rw, rh), Image.Resampling.NEAREST)
        ).astype(bool)
        ref = ref[oy : oy + oh, ox : ox + ow]
        ref = ref[:, ::-1] if g.flip else ref
        assert (decode_masks([rle], g)[0].numpy() == ref).all(), seed


@pytest.mark.parametrize(
    "in_size,resized,offset,out_size",
    [
        ((480, 640), (123, 164), (0, 0), (123, 164)),
        ((100, 100), (33, 250), (0, 10), (33, 200)),
        ((37, 53), (100, 71), (20, 0), (64, 71)),
    ],
)
def test_rle_masks_match_pil_nearest_at_awkward_ratios(in_size, resized, offset, out_size):
    """Ratios where PIL's accumulated sample positions differ from floor((i + 0.5) * n_in / n_out)."""
    mask = np.random.default_rng(3).random(in_size) > 0.5
    scale = (resized[0] / in_size[0], resized[1] / in_size[1])
    g = Geometry(in_size, resized, scale, offset, out_size)
    ref = np.asarray(
        Image.fromarray(mask.astype(np.uint8)).resize(resized[::-1], Image.Resampling.NEAREST)
    ).astype(bool)
    ref = ref[offset[0] : offset[0] + out_size[0], offset[1] : offset[1] + out_size[1]]
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert (decode_masks([rle], g)[0].numpy() == ref).all()


def test_polygon_masks_rasterized_unclipped_inside_crop():
    """A polygon partly outside the crop = that polygon rasterized on a canvas holding all of it, cropped."""
    poly = [[5.0, 3.0, 70.0, 20.0, 60.0, 55.0, 20.0, 48.0, -4.0, 30.0]]
    for seed in range(25):
        g = train_transform(40)(Geometry.identity(50, 70), np.random.default_rng(seed))
        (sy, sx), (oy, ox), (oh, ow) = g.scale, g.offset, g.out_size
        margin = 200  # shift everything into a big canvas so that nothing is clipped there
        big = [
            [
                (v * (sx if i % 2 == 0 else sy)) + margin - (ox if i % 2 == 0 else oy)
                for i, v in enumerate(poly[0])
            ]
        ]
        canvas = mask_utils.decode(
            mask_utils.merge(mask_utils.frPyObjects(big, oh + 2 * margin, ow + 2 * margin))
        )
        ref = canvas.astype(bool)[margin : margin + oh, margin : margin + ow]
        ref = ref[:, ::-1] if g.flip else ref
        assert ref.sum() > 0 and (decode_masks([poly], g)[0].numpy() == ref).all(), seed


# ------------------------------------------------------------------------------------------------ samplers


def test_repeat_factors_by_hand():
    cats = [[0], [0, 1], [0], [2], []]  # 5 images: f0 = 3/5, f1 = f2 = 1/5
    t = 0.5
    r1 = math.sqrt(t / (1 / 5))  # 1.58; r0 = max(1, sqrt(0.5 / 0.6)) = 1
    assert torch.allclose(repeat_factors(cats, t), torch.tensor([1.0, r1, 1.0, r1, 1.0]))
    assert torch.equal(repeat_factors(cats, 0.001), torch.ones(5))  # LVIS t: all frequent here


def test_sampler_shards_are_disjoint_and_cover_the_epoch():
    cats = [[i % 7] for i in range(40)] + [[7], [8, 0]]  # categories 7, 8 rare -> repeated
    world = 3
    samplers = [
        RepeatFactorSampler(cats, threshold=0.1, seed=5, rank=r, world_size=world) for r in range(world)
    ]
    for epoch in (0, 1):
        keys = samplers[0].epoch_keys(epoch)
        counts = Counter(i for i, _ in keys)
        factors = repeat_factors(cats, 0.1)
        for i in range(len(cats)):  # stochastic rounding: floor or ceil of the factor
            assert math.floor(factors[i]) <= counts[i] <= math.ceil(factors[i])
        shares = []
        for r, s in enumerate(samplers):
            s.set_epoch(epoch)
            it = iter(s)
            n = len(range(r, len(keys), world))
            shares.append([next(it) for _ in range(n)])
        assert sorted(k for share in shares for k in share) == sorted(keys)  # union = the epoch's list
        assert len({k for share in shares for k in share}) == len(
            keys
        )  # disjoint (seeds are unique per entry)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    # The iterator runs on into the next epoch.
    s = RepeatFactorSampler(cats, threshold=0.1, seed=5)
    it = iter(s)
    n0 = len(s.epoch_keys(0))
    assert [next(it) for _ in range(n0 + 3)] == s.epoch_keys(0) + s.epoch_keys(1)[:3]


def test_sampler_stochastic_rounding_mean():
    cats = [[0]] * 9 + [[1]]  # f1 = 0.1, t = 0.25 -> r = sqrt(2.5) = 1.581
    s = RepeatFactorSampler(cats, threshold=0.25, seed=0)
    mean = np.mean([Counter(i for i, _ in s.epoch_keys(e))[9] for e in range(400)])
    assert abs(mean - math.sqrt(2.5)) < 0.08


def test_sampler_determinism():
    cats = [[i % 5] for i in range(30)]
    a = RepeatFactorSampler(cats, threshold=0.3, seed=1)
    b = RepeatFactorSampler(cats, threshold=0.3, seed=1)
    c = RepeatFactorSampler(cats, threshold=0.3, seed=2)
    first = lambda s, n=60: [k for k, _ in zip(iter(s), range(n), strict=False)]  # noqa: E731
    assert first(a) == first(b) and first(a) != first(c)
    assert first(a) != [k for k in a.epoch_keys(0)]  # shuffled...
    assert sorted(i for i, _ in a.epoch_keys(0)) != [i for i, _ in a.epoch_keys(0)]
    unshuffled = RepeatFactorSampler(cats, threshold=0.3, seed=1, shuffle=False).epoch_keys(0)
    assert [i for i, _ in unshuffled] == sorted(i for i, _ in unshuffled)  # ... unless told not to
    a.set_epoch(3)
    assert first(a, 10) == a.epoch_keys(3)[:10]
    with pytest.raises(ValueError, match="rank"):
        RepeatFactorSampler(cats, rank=2, world_size=2)


@pytest.mark.parametrize("n,world", [(10, 3), (2, 3), (9, 3), (0, 2), (7, 1)])
def test_inference_sampler_contiguous_shards(n, world):
    shards = [list(InferenceSampler(n, rank=r, world_size=world)) for r in range(world)]
    assert sum(shards, []) == list(range(n))  # contiguous, in order, no duplicates, no padding
    assert [len(s) for s in shards] == [
        len(InferenceSampler(n, rank=r, world_size=world)) for r in range(world)
    ]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_aspect_ratio_grouping():
    is_wide = np.array([i % 3 == 0 for i in range(30)])
    keys = [(i, 100 + i) for i in range(30)]
    batches = list(AspectRatioGroupedBatchSampler(keys, is_wide=is_wide, batch_size=4))
    assert len(batches) == 2 + 5  # 10 wide -> 2 full batches, 20 tall -> 5
    for batch in batches:
        assert len(batch) == 4 and len({bool(is_wide[i]) for i, _ in batch}) == 1


# ------------------------------------------------------------------------------------------------ loaders


def _batches(loader, n):
    out, it = [], iter(loader)
    for _ in range(n):
        images, targets, infos = next(it)
        out.append((images, targets, [i["image_id"] for i in infos]))
    return out


def test_train_loader_reproducible_across_worker_counts(rect_dataset):
    json_path, root = rect_dataset
    ds = DetectionDataset(json_path, root, transform=train_transform(64), filter_empty=True)
    runs = []
    for workers in (0, 2, 2):
        sampler = RepeatFactorSampler(ds, seed=3)
        runs.append(_batches(build_train_loader(ds, sampler, batch_size=2, num_workers=workers, seed=3), 3))
    for run in runs[1:]:
        for (im_a, t_a, id_a), (im_b, t_b, id_b) in zip(runs[0], run, strict=True):
            assert id_a == id_b
            assert all(torch.equal(x, y) for x, y in zip(im_a, im_b, strict=True))
            assert all(torch.equal(x["masks"], y["masks"]) for x, y in zip(t_a, t_b, strict=True))
    # Different draws of the same image get different augmentations.
    assert len({tuple(im.shape) for b in runs[0] for im in b[0]}) > 1


def test_integer_keys_use_distinct_reproducible_worker_generators(rect_dataset):
    json_path, root = rect_dataset
    ds = DetectionDataset(json_path, root, transform=train_transform(64), filter_empty=True)

    def shapes(seed):
        loader = torch.utils.data.DataLoader(
            ds,
            sampler=[0] * 8,
            batch_size=1,
            num_workers=2,
            collate_fn=collate,
            worker_init_fn=__import__("divergen.data").data.worker_init_fn,
            generator=torch.Generator().manual_seed(seed),
        )
        return [tuple(b[0][0].shape) for b in loader]

    ds[0]  # the main process's generator now exists: forked workers must not inherit its state
    a = shapes(0)
    assert a == shapes(0) and a != shapes(1)
    assert a[0::2] != a[1::2]  # worker 0 and worker 1 draw differently


def test_test_loader_shards_in_order(rect_dataset):
    json_path, root = rect_dataset
    ds = DetectionDataset(
        json_path,
        root,
        transform=ResizeShortestEdge(short_edge=64, max_size=100),
        filter_empty=False,
        load_masks=False,
    )
    seen = []
    for rank in range(2):
        for images, targets, infos in build_test_loader(ds, num_workers=0, rank=rank, world_size=2):
            seen += [i["image_id"] for i in infos]
            assert max(images[0].shape[1:]) <= 100 and "masks" not in targets[0]
    assert seen == [1, 2]


def test_resume_by_skipping_batches_replays_the_same_samples(rect_dataset):
    """What the engine does on --resume: rebuild the loader, skip the batches already trained on."""
    accelerate = pytest.importorskip("accelerate")
    json_path, root = rect_dataset
    ds = DetectionDataset(json_path, root, transform=train_transform(64), filter_empty=True)

    def loader():
        return build_train_loader(ds, RepeatFactorSampler(ds, seed=1), batch_size=1, num_workers=0, seed=1)

    full = _batches(loader(), 6)
    resumed = _batches(accelerate.skip_first_batches(loader(), 3), 3)
    for (im_a, t_a, id_a), (im_b, t_b, id_b) in zip(full[3:], resumed, strict=True):
        assert (
            id_a == id_b and torch.equal(im_a[0], im_b[0]) and torch.equal(t_a[0]["boxes"], t_b[0]["boxes"])
        )
