"""Golden Jetstream v2 segment files, byte for byte as bluesky-social/jetstream's Go code wrote them.

Copied (base64) from the public repository bluesky-social/jetstream (MIT OR Apache-2.0), where they
pin the on-disk format:

* ``GOLDEN_CORPUS_SEGMENT``: ``internal/corpus/testdata/golden_corpus_segment.jss``: the 23 records of a
  real repository (``did:plc:53iucmf5ldftgqyf2ac7hmhd``) as kind-1 rows, seq 1..23, witnessed_at
  1_750_000_000_000_000 + seq, 8 rows per block; ``CORPUS_RECORD_CIDS`` is that repository's
  ``collection/rkey -> CID`` listing as ``goat repo ls`` (indigo) printed it
  (``internal/corpus/testdata/car_expected_records.tsv``).
* ``GOLDEN_SEAL``: ``segment/testdata/golden_seal.bin`` (``TestSealGolden``: two rows, two per block).
* ``GOLDEN_BLOCK``: ``segment/testdata/golden_block.bin`` (``TestGolden``: one compressed block of a
  create, an identity and a delete).
"""

from __future__ import annotations

import base64
from typing import Final

GOLDEN_CORPUS_SEGMENT: Final = base64.b64decode(
    "anNzMEG2jyw+HsWKAQADAAAAFwAAAAEAAAABAAAAAAAAABcAAAAAAAAAAWBboJ03BgAXYFugnTcGALwLAAAAAAAAWAwAAAAAAACx"
    "DAAAAAAAAMQNAAAAAAAAvAsAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAADIEAAAAAAAAKLUv/WRGCiUhAApJDA45UA9s903QFWYD1OtcUlQR7TNkhFIS"
    "UWYmJRElUWZSZvL4G5iqPDPavL+siMje3+F2hTNO8mdNs78D5QDMAMsA36NKWLoOlR3qoQODmmFOSyhTgYoWM2KQgLy4IGPa0IBB"
    "io8DEmRMbwYMFyZOoLDAAUmQQUN5oAECi6fuKWLLLi35WFX/7qCOiBq+IPxEymLJ5SZNtDm7YtfUbN8mveezo5q0sYHw4p4d1rgk"
    "/zWfz7NrLe5Jefn0nV1tvfkaohGtsnty5fRKN07Znl/Z/tAMH2l67OBkZj2hmEY4R2itT834obaObKpPGfkRdyJaS2WFxlUUBQYC"
    "BAIUSAIFGgYKEBggIAAAhUD08GEDBw1FMaAoBRSFgKIMUBQBihJAAaBoKIpiIJWfU4ajqydc/axD0Mk0o7JGlzkyWrpthx4ZwUhB"
    "NLNs7rNCjue2Rjhv2iD8c+x36+w4Oqd03RwPdH6yj0NN74oXhiZ8r2X+cXBMuqyA4e3nr+KDb0/44vc4e9G9vwVRbVe9YYzSC52H"
    "Tgyr4rYUj9bTJsV1/0c6EjCK5wQhsTVF8Dql5pDb8QWpmU7yQiSEYwjH1wMSAauSxPBl1hzTiMNE4a7xnrzS6MM1JiJZJpI3YRgP"
    "SduAywZsS1uA9Qm0dln3xHbSHNVKCeOqA+2qnjOppaRVH2Y/9EzzRRdxzGRhJo/xaMtGzFrkPbzk8/DoOG+iDsTYBSe1srntYdfV"
    "nb4k1OxWm+lj9FQEUW1X+1hMhvjocC/i3GRZJkzziMxGs9ukku/qMCyjaH0L0jw5un+pqwpuiCU5TcipKiXxhRXls8m5TmPxLNPJ"
    "0e3r5vKpQZW0rbxVZuFIwylVCf06eQ9l0oTcol5zGsn/ZDPoSs5x1a+k84NpJBH3Jq5NlnYbRkE6K11dROXVfFshK8VIUxbq2TSF"
    "CkkBHx2LJNKYp3H/YBHUko/Notaukt4XVl2sandZN+e/OILyTdxg/rWbb+Qa8jxz/nqWpSMi+W1S1L21Yh1DTl2JeQnaeEno+cg5"
    "h7JWcW9cw0tjy1gUfTvdi00s75xVsiyRZpEwHg1TNY6/haHT/N+3obR8jtcTNKOMKXZF8soLJR6l6lvUg3wk4Ssh5Nv1qksPZCQR"
    "pk1gm7jm0SE1PjFr38U9otabm2bZsuw51JpijpRV+i6dvJ6cOYpWhDHUkv5Qxq+n9q6iFUggMIMRAZsBN6KXoCN9on9lBkqgo7C0"
    "0v4qM1ACOVI/T2VQsisC4M1X5prTOz9Gtu8RgcMS0AQy8gLGGUFAlEBrnfxYqiwDB7rxxMAFabZL9vICKbLnbaCo6uF+WyIwmDzd"
    "ObZmcpaPRYTnXeQNEImI7vjUUxUTl7WmHj8UPkYkhjEyLtJkJot8M8uC85302yjjjTaujOiL0sEYGByXWVdENAMAAAAAAAAotS/9"
    "ZDAJNRkAsrOfN2BL2AD//Ml//nmz1aG+UYgNURJRJhElkfQvu8WLjweGGgASAiM2JmVmEmpTjZEco8mqqSoaUAoVyeKQCYWJCvOc"
    "c4mCOMhIbHX0UIMFm7GppX5hkZ+q9Pz6NE1NXeE11lgIGk14jTXOxX4a2Uf0fv24pS6LrN9nrYqiMLBFMNXMOz0CjhMRgY+RCQMV"
    "iucaS/TUlCr0N0pvOdF2L8vutKS+P8Eto6ZpKOgqd7OxcLRkkbVUaFt0mRhT9OKxKz3F0Pk1Y0IdKhYYkZcwisI4GmH/HJOISMjA"
    "yCgKxYRrxOgbi+xE877OWGKgM5YYOlO2MjCIkS0j24fC0vs15VDx4II8eExUkgZMGst1DnvslNixD73yqT6H9TjXVONdLitiOcty"
    "tFTWf7P3MIXOyiWiHDomPU5UHiAwYaAClYZToHM3OoS1lRAESc2Vp87olKhq2plVWe7HVfu3fvsjnqRsPfmpT+b35eW6V8gkIonC"
    "TEDGKRQxaUwkjegSp2BrCfT1fMqt5Dyb9DNBvO+T0BlLEjW+KnJqgyN4ycs6PELosgpKSDB6UtiWqhyLjsdzqMoixyWfNvdlM2t3"
    "DLP1sk6l5/KXy5RtGz2+UPnWY5/C6mwgbGrdL7S/o6myQ72EaQe/4eHs5ahctqZDj+lh91XOn8uSGXYPe5trT02+D3Mu9+ORsU/3"
    "UeeWx/RYkU/3PRwWp60SOxZ61fkym4V6W0LvuYxRr570sPvoAz3Sp6vY5OhKb6yQV/ZFxq/EUEt1xtI/7EXof0WwR24QSZrtQ2sA"
    "MNDWmoeIiMZIAADBAQMRBSAItAAygwYLFwa0hqC1A60ZaC2itQKtQTQCbUBrTUBGIPCCEZCh8VJQo+cBhIwYPSkAOkvMdQnqicaM"
    "DoHuJFxIIVeED5txHoOsjeFufHiAgRktWhiACpwWBOQEorWt7S1biHyFB0pAvS1PT5YH5Ckf+6c1Ok9Ggo7T0uZEvQStq0awxeSo"
    "RPSNWazHAD+DJ9GCuonqZdAdKVILza5jOGBlMYKYjCORY+tKIUG+mc0iH5mFLCb9NpLxxjaUjMCLgsEYMhykszEfPgMAAAAAAAAo"
    "tS/9ZN4GhRkAErSoPCAR4gABGGghOo+CQBFVWNyxBLkAGB53bSnlllu5JkTSI/PYLmTFMTmgSOyF0pIk1sZDwtGjo9UPSwP8ZR4o"
    "BWqkjD5k5MyKlYyVTIWqp2ke9s2supZ1YZQl3F1+am1sjWqNPpwKnQzUQRSo+ZAR5Ykcp0KZTO28DlF2hnNuUGVdYKbsnjaUfJ38"
    "gBoqo+pE06k4knkkA1GT83SupmvalvVpH1fZanvhv+VqtfBkufRvD2WQekrTll55T6Uv9qhOJ27S/2FtQ5mRdSJHViiSsc+c3FTp"
    "Te+u1Q3q/sEPh99lolu2Pfpx/F1wmlWi01P7c4FP4Uw/1VZd0MTvpDiNlRGlRlJWHMlAcps4X257+mWcTia60u6atIRdz8VetgXX"
    "55lh90wmUb8Wvr11eN/KeqBXM7+krIM307S61W3dC1sk7bG7qaphXXhJlAR5XMjzJe3fQH0lCV/eGKfo+C1Sx00qPDhQbZwnmk5k"
    "ncqUjHSYOuVU8PUK+fv9De/rpRHcdF3+mYAFnZr2UzoWWED1vC+fAtv9Zuj4M+5WT2ZN9mdg5a1tURLGpayBhIjI4MPN5efGpEOL"
    "CyAqMBrojhIOMMRwkULA8wIHChkzcgAoQWHCABsSjw0dEQKHCDX0b3jFN71z33PnF6/IL1n/22dgf/D5YjzrJNjn7Uk6913r3/fM"
    "opr7Ytna8oktL1sgpjun37RU3TiVMMfpNCd4sZ5fWOMUmp6F1oewaVuUTtt5f+lrd06zCWYQxV3TonGKzQmG96LnnRbNlEVZfKcG"
    "tanrzKu2cLdpjTDPorzzBeMc0w2V3W36rXNY1uR/3YAVJzVZdqtII8YOAAQIREkkEoFAIB4dCRBEIAc8IgBr4sSHEAZiTBAjghgj"
    "MUJiPBA9ooEYY4A8INCCmRnaDIjObURrD0wRBJcA9G1i1cDUdpCgIULEVHNQrgmmS1QSDM7V8+QShD7DbMwqPvtRwRMJkTIhjwum"
    "ZKBZ7VbkeHZ04nA7kYgoF+vYIlLA4la4BUC8XRcOesMpQhiWGi3p7sSqDBPFwCU4XH44XOFEdxzDSXfv2LhJXOc0N+KStymHYKBF"
    "TY4h3wABAAAAAAAAMgQAAEYLAAAIAAAAAQAAAAAAAAAIAAAAAAAAAAFgW6CdNwYACGBboJ03BgA6BQAAAAAAADQDAAAwCgAACAAA"
    "AAkAAAAAAAAAEAAAAAAAAAAJYFugnTcGABBgW6CdNwYAdggAAAAAAAA+AwAA3gcAAAcAAAARAAAAAAAAABcAAAAAAAAAEWBboJ03"
    "BgAXYFugnTcGAAEPAAAAAQAAAAAAAAABAAAAAAAAAIAAECAAAAIAAAggAAAAAAAABBAAAAAAAAAgAAAAABAAAAAIAAAAAAAAAgAA"
    "AQAAAAAAAAQAAAAAAAAAAgAAAAAmBA/wAwAAAFkAAAABDwAAAAEAAAAAAAAAAQAAAAAAAACAABAgAAACAAAIIAAAAAAAAAQQAAAA"
    "AAAAIAAAAAAQAAAACAAAAAAAAAIAAAEAAAAAAAAEAAAAAAAAAAIAAAAAJgQP8AEPAAAAAQAAAAAAAAABAAAAAAAAAIAAECAAAAIA"
    "AAggAAAAAAAABBAAAAAAAAAgAAAAABAAAAAIAAAAAAAAAgAAAQAAAAAAAAQAAAAAAAAAAgAAAAAmBA/wAQ8AAAABAAAAAAAAAAEA"
    "AAAAAAAAgAAQIAAAAgAACCAAAAAAAAAEEAAAAAAAACAAAAAAEAAAAAgAAAAAAAACAAABAAAAAAAABAAAAAAAAAACAAAAACYED/AF"
    "AAAAAwAAAAEAAAB/AAAAKLUv/QQAjQIARAQWAQAAAGFwcC5ic2t5LmFjdG9yLnByb2ZpbGUSCmZlZWQubGlrZRIGcG9zdBQDcmVw"
    "b3N0FWdyYXBoLmZvbGxvdwMGHAQQBHwYnYvOPuecj6TpgA=="
)

GOLDEN_SEAL: Final = base64.b64decode(
    "anNzMHy5iFy7SaoDAQABAAAAAgAAAAIAAAABAAAAAAAAAAIAAAAAAAAAZAAAAAAAAADIAAAAAAAAAHEBAAAAAAAApQEAAAAAAAD+"
    "AQAAAAAAAF8CAAAAAAAAcQEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAGkAAAAAAAAAKLUv/QQA5QIAksQQGrDBAP+v+/+vQWIFRqWxetnOwyEHLCNC"
    "gnceZ82eZ95RoyqhoC1KlktZI9ywJdcSSqFOld30//fwIATRDhhgp2+0/QkALMRXU4ZbuQqEgLrgRkpDFcwYHBy+flweAAEAAAAA"
    "AABpAAAAigAAAAIAAAABAAAAAAAAAAIAAAAAAAAAZAAAAAAAAADIAAAAAAAAAAEPAAAAAQAAAAAAAAACAAAAAAAAAEIAoAFAICCA"
    "AgAAAkAAIAgAAAAAAAsAAAAgAAAACCAAQAABAEABAAAAAAAAAAACBACAAAAAAAAgAAIAAAAgAABqpzqgAQAAAFkAAAABDwAAAAEA"
    "AAAAAAAAAgAAAAAAAABCAKABQCAggAIAAAJAACAIAAAAAAALAAAAIAAAAAggAEAAAQBAAQAAAAAAAAAAAgQAgAAAAAAAIAACAAAA"
    "IAAAaqc6oAIAAAABAAAAAQAAAC8AAAAotS/9BAAlAQDEARIBAAAAYXBwLmJza3kuZmVlZC5wb3N0bGlrZQMBVBMEEDVE5NoB"
)

GOLDEN_BLOCK: Final = base64.b64decode(
    "KLUv/UQAHQD9BQBkCQMAAAABAAIAAwAAAEAeGCQKBgBAgi2AxDwg4SUBBAMSABIgABMAIAANAA0NAA0IAAAAYXBwLmJza3kuZmVl"
    "ZC5wb3N0bGlrZWRpZDpwbGM6YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4ZGlkOndlYjpleGFtcGxlLmNvbXozbDNxbzJ2dW93bzJi"
    "Y3Rzd2OhZWhlbGxvBRAAIICeewBxweQeV9lZ9e415e3z2cy3dgoXiiy4YaX9FIEqgzE4OBF4n0s="
)

CORPUS_RECORD_CIDS: Final = {
    "app.bsky.actor.profile/self": "bafyreia3zwwmogntyn7zhsr6kyzvelma2l77axbldfja6jwcqbjq5e5tj4",
    "app.bsky.feed.like/3lqdkdjpy6t2e": "bafyreigmpffgbpgzfhvml36cecdcz7cn2v7kde2ar7ib4jgol7grj4jyly",
    "app.bsky.feed.like/3lrtfauocr722": "bafyreidc3d3q7ddtrdnoc52t5lfzmpu7rp2yvhynwdna27f5etlz3pzu4e",
    "app.bsky.feed.like/3lsyfcwyams2x": "bafyreigr42szav77jmphd52ku6fqxq3vxqzcqmix53hqiklw33b4otwmdy",
    "app.bsky.feed.like/3ltih5567ga2o": "bafyreiac6lx3x57j7iz6ky5c26ot4opf5qz2525u4pgnob5rjaym5vstyy",
    "app.bsky.feed.like/3lu44m2hrze2o": "bafyreib3q4cxabhoiuryanlmlszwojmxejubj6xjtkyjb34qx5n7rurjb4",
    "app.bsky.feed.like/3lu44m63ier2o": "bafyreicvzey3zf35ycctgpx42tpezihakq5lqackfjggtmnzo3obmepxcq",
    "app.bsky.feed.like/3lu44mb2dnm2l": "bafyreiaebkgbfbjglftyzjqkmrs6646agkwnij6kdvd2ybpwryooabzsqi",
    "app.bsky.feed.like/3ly3p3ucdys23": "bafyreidbp5ukhwbe5d7fvyd5pmbelkelchnn3vcssmcditfvjw2hrcn63y",
    "app.bsky.feed.like/3m7x3r6ba6c2f": "bafyreiaiuscswjqnvkccnzjd3nvuekqp6d4xoexj3tzzgb27q3mxxquibu",
    "app.bsky.feed.like/3migo7fia5y2k": "bafyreigpokdrfueqwktlyvjattxf5pxuowrh2xxtq5lxqk2xd5y74ccopm",
    "app.bsky.feed.post/3lqcnvhqk622d": "bafyreia6dvxmf6vnz6novba2cu24rbbbn7x4qelt7valzz32xngvep5lem",
    "app.bsky.feed.post/3lqcoskkx7c2y": "bafyreif2w253drzt5qxjytssmvhv4vyaw6525qpvntxc2zezku52scejle",
    "app.bsky.feed.post/3lsbqxwblik2d": "bafyreidpwtz35ccugsxi5onzz5xlfpxskuourbppxlcsuxwa235nopf244",
    "app.bsky.feed.post/3ly3oz7vwhc2u": "bafyreicvnahnm4ckdevcakjqfsgbtsjqd4dlp7am5inmaullm2ysrk72me",
    "app.bsky.feed.post/3ly3qkmcavs2u": "bafyreiho5av5xrcw3qdhrxjf6m46whqzcmirc5uco2copnps7wa6jvh7ey",
    "app.bsky.feed.post/3m2a2fwazy22o": "bafyreiaqlvgz3ls6bwndbb6k2j7kyri45obdtwrbru2z6myoxlihyegmpe",
    "app.bsky.feed.repost/3lqj2nsh6py2p": "bafyreicdahtqissahjzgnysa6b24ovs5cmzjuuneyjaemc5pkivzqhagrm",
    "app.bsky.feed.repost/3ltinfnevu723": "bafyreigifgfqpenfkvytrrsr6id2a7w5rwgqo45iztewffojdvp3jbzdyq",
    "app.bsky.feed.repost/3migo6e53jv26": "bafyreiaylislwyxvtzyxlmffltv6nupbsuaumu2afg5ck53gocetbmikha",
    "app.bsky.graph.follow/3lqcnlemwy22g": "bafyreif5fih53362lvvg4xjtsynvyzlksbhrufhqfqg2ksnhvhytgt6pcu",
    "app.bsky.graph.follow/3lscb3lr5h72x": "bafyreia47eepae5hfyyknz5seh6o4pgrw4z47mi2bxbyaiuim4f5dxfy7u",
    "app.bsky.graph.follow/3ltfoymdvmc2l": "bafyreicz6orysidbjauemqk27iix3u3vsvkylhuib4vxzsv7aiyqfn2oya",
}
