"""``info``'s text: Docker's devicemapper ``docker info`` block, and the one-line
descriptions of the autoextend, low-water and zero-detection settings (``info``, ``set``)."""

from fusepool.units import human_size


def describe_autoextend(st: dict) -> str:
    if st.get("autoextend_threshold", 100) >= 100:
        return "off"
    text = f"at {st['autoextend_threshold']:g}% used, grow by {st['autoextend_percent']:g}%"
    return text + (f", up to {human_size(st['max_data_size'])}" if st.get("max_data_size") else "")


def describe_low_water(st: dict) -> str:
    if not st.get("low_water_mark"):
        return "off"
    hook = st.get("on_low_water")
    return f"{st['low_water_mark']} blocks" + (f", runs {hook}" if hook else "")


def describe_zero_detection(st: dict) -> str:
    return "on" if st.get("zero_detection") else "off"


def format_info(st: dict) -> str:
    """Docker's devicemapper ``docker info`` block, same names and size format."""
    lines = [
        ("Pool Name", st["pool_name"]),
        ("Pool Blocksize", human_size(st["block_size"])),
        ("Base Device Size", human_size(st["base_size"])),
        ("Backing Filesystem", st["backing_filesystem"]),
        ("Data file", st["data_file"]),
        ("Metadata file", st["metadata_file"]),
        ("Data Space Used", human_size(st["data_space_used"])),
        ("Data Space Total", human_size(st["data_space_total"])),
        ("Data Space Available", human_size(st["data_space_available"])),
        ("Metadata Space Used", human_size(st["metadata_space_used"])),
        ("Metadata Space Total", human_size(st["metadata_space_total"])),
        ("Metadata Space Available", human_size(st["metadata_space_available"])),
        ("Thin Pool Minimum Free Space", human_size(st["min_free_space"])),
        ("Deferred Removal Enabled", "true"),
        ("Deferred Deletion Enabled", "true"),
        ("Deferred Deleted Device Count", str(st["deferred_deleted_device_count"])),
        ("Library Version", st["library_version"]),
        ("Mode", st["mode"]),
        ("Autoextend", describe_autoextend(st)),
        ("Low Water Mark", describe_low_water(st)),
        ("No Space Policy", f"queue ({st['no_space_timeout']:g} s)" if st.get("no_space_timeout")
         else "error"),
        ("Zero Detection", describe_zero_detection(st)),
        ("Volumes", str(st["volume_count"])),
        ("Mounted At", st.get("mounted") or "-"),
    ]
    if st.get("nbd"):
        lines.append(("NBD Exports At", ", ".join(st["nbd"])))
    if st.get("read_only"):
        lines.append(("Read Only", st["read_only"]))
    return "Storage Driver: fusepool\n" + "\n".join(f" {k}: {v}" for k, v in lines)
