#!/usr/bin/env python3
"""What content-defined chunking would make of a whole-image delta (#16 item 3), before building it.

  delta-cdc.py [OLD NEW]     (default: the anchors' /tmp/ota-work/v1.ext4 and v2.ext4, which
                              ../shared/anchors/ota/01-payload.sh makes)

Needs python3 with `fastcdc` and `zstandard` from PyPI (a venv: python3 -m venv V &&
V/bin/pip install fastcdc zstandard). Numbers only.

For each average chunk size (FastCDC, min avg/4, max 4 x avg) it chunks both images, counts the
new image's chunks whose bytes the old one has (copies) and the bytes of the others, and
compresses each new chunk at zstd level 19 three ways: alone; with the chunk before it in the
new image as a raw prefix (the installer has just written and verified it, copied or not); with
the 1 MiB of the new image before it as the prefix. The manifest is estimated at 100 bytes a
chunk (today's JSON entry) and at 40 (a 32-byte hash and two lengths): the delta is the frames
plus the manifest.
"""
import hashlib
import sys
import time

import zstandard
from fastcdc import fastcdc

old_path, new_path = (sys.argv[1:3] if len(sys.argv) == 3
                      else ("/tmp/ota-work/v1.ext4", "/tmp/ota-work/v2.ext4"))
old = open(old_path, "rb").read()
new = open(new_path, "rb").read()
MIB = 1 << 20


def cuts(data, avg):
    return [(c.offset, c.length)
            for c in fastcdc(data, min_size=avg // 4, avg_size=avg, max_size=avg * 4, fat=False)]


def digest(data):
    return hashlib.blake2b(data, digest_size=16).digest()


def frames(chunks, carried, prefix_of):
    total = 0
    for i in carried:
        offset, length = chunks[i]
        prefix = prefix_of(i, offset)
        dict_data = (zstandard.ZstdCompressionDict(prefix, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
                     if prefix else None)
        compressor = zstandard.ZstdCompressor(level=19, dict_data=dict_data,
                                              write_content_size=True, write_dict_id=False)
        total += len(compressor.compress(new[offset:offset + length]))
    return total


print(f"old {old_path} ({len(old)} B), new {new_path} ({len(new)} B)")
for avg in (4096, 8192, 16384, 32768, 65536):
    start = time.time()
    old_chunks, new_chunks = cuts(old, avg), cuts(new, avg)
    have = {digest(old[o:o + n]) for o, n in old_chunks}
    carried = [i for i, (o, n) in enumerate(new_chunks) if digest(new[o:o + n]) not in have]
    carried_bytes = sum(new_chunks[i][1] for i in carried)
    alone = frames(new_chunks, carried, lambda i, o: None)
    previous = frames(new_chunks, carried,
                      lambda i, o: new[new_chunks[i - 1][0]:o] if i else None)
    back = frames(new_chunks, carried, lambda i, o: new[max(0, o - MIB):o] if o else None)
    count = len(new_chunks)
    print(f"avg {avg // 1024:2d} KiB: {count} chunks, {count - len(carried)} copied, "
          f"{len(carried)} carried ({carried_bytes} B); level-19 frames: alone {alone} B, "
          f"previous chunk as prefix {previous} B, 1 MiB back as prefix {back} B; "
          f"manifest {count * 100} B (100 B a chunk) or {count * 40} B (40 B) "
          f"[{time.time() - start:.0f} s]", flush=True)
