"""The anatomy hierarchy: every node and every source label resolves to the right node, MedSegDB keeps its
indices, rule-made spellings and misspellings resolve, names not in the tree are refused with suggestions, and
every level has an explicit unknown row."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import SimpleITK as sitk

from medsegx_core.data.hierarchy import (LEVEL_NAMES, context_indices, load_hierarchy, normalise, resolve_modality,
                                         resolve_structures, resolve_task_folder, resolve_term, word_key)
from medsegx_core.data.modality import guess_modality, routing_modality
from medsegx_core.data.volume import Volume
from medsegx_core.errors import PromptError, UnknownTermError

H = load_hierarchy()
ALL_NODES = list(H.nodes())
TASKS = list(H.nodes(4))


@pytest.fixture(scope="module")
def medsegdb(fixtures_dir):
    return json.loads((fixtures_dir.parent / "reference" / "medsegdb_hierarchy.json").read_text())


# ------------------------------------------------------------------------------------------- whole tree
def test_every_node_resolves_to_itself_by_every_spelling():
    failures = []
    for node in ALL_NODES:
        for spelling in node.spellings():
            resolved = resolve_term(spelling)
            # a spelling shared with a deeper node (level-3 "liver" vs task "liver") resolves to the deeper one
            if resolved.node is not node and not (resolved.node.level > node.level
                                                  and word_key(resolved.node.name) == word_key(spelling)
                                                  or node in _ancestors(resolved.node)):
                failures.append((spelling, node, resolved.node))
    assert not failures, failures[:10]


def _ancestors(node):
    out = []
    while node.parent is not None:
        node = node.parent
        out.append(node)
    return out


def test_no_two_tasks_share_a_spelling():
    seen = {}
    for node in TASKS:
        for spelling in node.spellings():
            other = seen.setdefault(word_key(spelling), node)
            assert other is node, (spelling, other, node)


def test_context_follows_the_path_with_unknown_below_inner_nodes():
    for node in ALL_NODES:
        resolved = resolve_term(node.name)
        if resolved.node is not node:
            continue
        rows = dict(zip(LEVEL_NAMES, resolved.context.rows()))
        for level in range(1, 5):
            ancestor = node.ancestor(level)
            expected = ancestor.index if ancestor is not None else H.unknown_index(LEVEL_NAMES[level])
            assert rows[LEVEL_NAMES[level]] == expected, (node, level)
        assert resolved.path[0] == "human body" and resolved.path[-1] == node.name
        assert resolved.context.modality == H.unknown_index("modality")


def test_unknown_rows_are_the_last_row_of_every_table():
    sizes = H.table_sizes()
    unknown = H.unknown_context()
    assert unknown.rows() == tuple(sizes[name] - 1 for name in ("root", "level1", "level2", "level3", "task",
                                                                 "modality"))
    # no node uses an unknown (or reserved) row
    for number, name in enumerate(LEVEL_NAMES):
        indices = [n.index for n in H.nodes(number)]
        assert max(indices) < sizes[name] - 1
        assert not set(indices) & set(H.reserved_rows.get(name, []))
    assert context_indices(None, "CT").rows()[:5] == unknown.rows()[:5]


# ---------------------------------------------------------------------------------------- MedSegDB parity
def test_medsegdb_tasks_keep_their_indices_and_ancestors(medsegdb):
    level_lists = {1: medsegdb["level1_body_parts"], 2: medsegdb["level2_subregions"],
                   3: medsegdb["level3_organs_tissues"]}
    for task in medsegdb["tasks"]:
        resolved = resolve_term(task["task"])
        assert resolved.node.medsegdb == task["task"]
        assert resolved.context.task == task["index"]
        for level, field in ((1, "level1_body_part"), (2, "level2_subregion"), (3, "level3_organ_tissue")):
            assert getattr(resolved.context, f"level{level}") == level_lists[level].index(task[field])
    for number, names in level_lists.items():
        for index, name in enumerate(names):
            assert H.node_at(LEVEL_NAMES[number], index).medsegdb == name
    for name in medsegdb["tasks_in_hierarchy_but_not_in_task_list"]:
        assert resolve_term(name).context.task > len(medsegdb["tasks"])   # after the reserved spare row
    for index, name in enumerate(medsegdb["modalities"]):
        assert resolve_modality(name).index == index
    for alias, name in medsegdb["modality_aliases"].items():
        assert resolve_modality(alias).name == name


@pytest.mark.parametrize("folder, rows", [("CT_Liver", (0, 1, 4, 17, 59, 2)),
                                          ("CT_LeftKidney", (0, 1, 4, 21, 65, 2)),
                                          ("MRI_Prostate2", (0, 1, 5, 27, 80, 7))])
def test_medsegdb_folder_names(folder, rows):
    resolved, _ = resolve_task_folder(folder)
    assert resolved.context.rows() == rows


# ------------------------------------------------------------------------------------- our data's labels
def test_every_totalsegmentator_and_freesurfer_label_resolves(data_dir):
    class_map = json.loads((data_dir / "totalsegmentator_class_map.json").read_text())
    freesurfer = json.loads((data_dir / "mri" / "brain_t1_aparc_aseg_labels.json").read_text())
    crop_labels = [name for f in ("chest_ct_aorta_crop_labels.json", "chest_ct_pulmonary_crop_labels.json")
                   for name in json.loads((data_dir / "ct" / f).read_text()).values()]
    names = [n for table in class_map.values() for n in table.values()] + crop_labels
    names += [n for n in freesurfer.values() if n != "Unknown"]
    resolved = {name: resolve_term(name) for name in names}
    assert all(r.node.level == 4 for r in resolved.values())
    assert all(r.match in ("exact", "synonym") for r in resolved.values())
    # distinct labels of one table are distinct nodes (lung lobes, vertebrae, ribs, cortical parcels)
    for table in list(class_map.values()) + [freesurfer]:
        nodes = [resolved[n].node for n in table.values() if n != "Unknown"]
        assert len({id(n) for n in nodes}) == len(nodes)
    # FreeSurfer structures sit under the brain / hippocampus and carry a group
    for name in freesurfer.values():
        if name != "Unknown":
            node = resolved[name].node
            assert node.parent.key in ("brain", "hippocampus") and node.group, name
    same = {"kidney_left": "LeftKidney", "liver": "Liver", "Left-Caudate": "LeftCaudatum",
            "inferior_vena_cava": "Postcava", "clavicula_right": "RightCollarBone", "CSF": "CerebroSpinalFluid"}
    for label, medsegdb_name in same.items():
        assert resolved[label].node is resolve_term(medsegdb_name).node


# ---------------------------------------------------------------------------------- rule-made spellings
@pytest.mark.parametrize("text", ["left kidney", "kidney_left", "LeftKidney", "L kidney", "kidney (left)",
                                  "Kidneys, left", "LEFT-KIDNEY", "lt kidney", "the left kidney"])
def test_rule_made_synonyms_of_left_kidney(text):
    resolved = resolve_term(text)
    assert resolved.name == "left kidney"
    assert resolved.path == ("human body", "body", "abdomen", "kidney", "left kidney")


def test_side_variants_resolve_for_every_sided_task():
    for node in TASKS:
        words = normalise(node.name).split()
        if len(words) < 2 or words[0] not in ("left", "right") or "(" in node.name:
            continue
        side, rest = words[0], words[1:]
        variants = ["_".join(rest + [side]), side[0].upper() + " " + " ".join(rest),
                    "".join(w.capitalize() for w in [side] + rest), f"{' '.join(rest)} ({side})"]
        for variant in variants:
            assert resolve_term(variant).node is node, (variant, node)


def test_british_spelling_and_plural():
    assert resolve_term("liver tumours").name == "liver tumor"
    assert resolve_term("oesophagus").name == "esophagus"
    assert resolve_term("left lungs").name == "left lung"


# ------------------------------------------------------------------------------------------ misspellings
def _misspell(text: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(text) - 1)
    kind = rng.choice(("drop", "swap", "double"))
    if kind == "drop":
        return text[:i] + text[i + 1:]
    if kind == "swap":
        return text[:i - 1] + text[i] + text[i - 1] + text[i + 1:]
    return text[:i] + text[i] + text[i:]


def test_misspellings_over_the_whole_tree_resolve_or_suggest_the_intended_name():
    rng = random.Random(4)
    accepted = suggested = 0
    wrong = []
    for node in ALL_NODES:
        if len(node.name) < 6 or not node.name.replace(" ", "").isalpha():
            continue
        typo = _misspell(node.name, rng)
        if word_key(typo) == word_key(node.name) or typo.replace(" ", "") == node.name.replace(" ", ""):
            continue   # not a misspelling (a dropped space gives MedSegDB's own name, e.g. 'cervicalspine')
        try:
            resolved = resolve_term(typo)
        except UnknownTermError as error:
            if node.name in error.suggestions:
                suggested += 1
            else:
                wrong.append((typo, node.name, error.suggestions))
            continue
        if resolved.node is node or node in _ancestors(resolved.node) or resolved.node.name == node.name:
            assert resolved.match == "fuzzy"
            accepted += 1
        else:
            wrong.append((typo, node.name, resolved.name))
    total = accepted + suggested + len(wrong)
    assert total > 200
    # a typo is never silently taken for another structure (at worst the intended name is not suggested)
    assert not [w for w in wrong if isinstance(w[2], str)], wrong
    assert accepted / total > 0.8, (accepted, suggested, wrong[:10])
    assert (accepted + suggested) / total > 0.95, wrong[:10]


@pytest.mark.parametrize("typo, name", [("livr", "liver"), ("spleeen", "spleen"), ("rigth kidney", "right kidney"),
                                         ("lfet lung", "left lung"), ("aortta", "aorta"),
                                         ("gluteus max left", "left gluteus maximus")])
def test_common_misspellings_resolve(typo, name):
    resolved = resolve_term(typo)
    assert resolved.name == name and resolved.match == "fuzzy"


def test_misspelt_side_never_flips_to_the_other_side():
    for typo in ("lef kidney", "letf adrenal gland", "rihgt lung"):
        resolved = resolve_term(typo)
        assert ("left" in resolved.name) == typo.startswith("le")


# ------------------------------------------------------------------------------------------ not in the tree
@pytest.mark.parametrize("text", ["banana", "flux capacitor", "zzzz", "tumour of the left toe nail"])
def test_names_not_in_the_tree_raise_with_a_clear_message(text):
    with pytest.raises(UnknownTermError) as info:
        resolve_term(text)
    assert info.value.text == text
    assert repr(text) in str(info.value) and "medsegx categories" in str(info.value)


def test_close_but_ambiguous_names_get_suggestions():
    with pytest.raises(UnknownTermError) as info:
        resolve_term("pancreatic")
    assert "pancreas" in info.value.suggestions


# ------------------------------------------------------------------------------------- lists of structures
def test_a_list_splits_resolves_and_drops_duplicates_after_resolution():
    """The one list rule (command line, batch script, Slicer text field): commas, semicolons and new lines,
    repeated options, order kept, one structure per meaning ("Liver, liver", "kidney_left, left kidney")."""
    assert [t.name for t in resolve_structures("Liver, liver;kidney_left\nleft kidney, ")] == \
        ["liver", "left kidney"]
    assert [t.name for t in resolve_structures(["spleen", "liver, L kidney"])] == ["spleen", "liver", "left kidney"]
    assert resolve_structures("  ") == [] and resolve_structures(None) == [] and resolve_structures([]) == []
    groups = {"upper abdomen": ("liver", "spleen")}
    assert [t.name for t in resolve_structures("stomach, Upper Abdomen, liver", groups)] == \
        ["stomach", "liver", "spleen"]


def test_a_list_with_an_unknown_name_is_refused_naming_it():
    with pytest.raises(UnknownTermError, match="unknown structure 'splen kidnee xyz'") as info:
        resolve_structures("liver, splen kidnee xyz, spleen")
    assert info.value.text == "splen kidnee xyz"


@pytest.mark.parametrize("text", ["", "   ", None])
def test_empty_text_is_a_prompt_error(text):
    with pytest.raises(PromptError, match="empty text prompt"):
        resolve_term(text)


def test_new_leaf_under_a_known_node_has_known_ancestors_and_unknown_task():
    leaf = H.new_leaf("liver cyst", "liver")
    assert leaf.name == "liver cyst" and leaf.path[-2:] == ("liver", "liver cyst")
    liver = resolve_term("liver").context
    assert (leaf.context.level1, leaf.context.level2, leaf.context.level3) == (liver.level1, liver.level2,
                                                                               liver.level3)
    assert leaf.context.task == H.unknown_index("task")


# ------------------------------------------------------------------------------------------------ modality
@pytest.mark.parametrize("text, name", [("CT", "CT"), ("MR", "MRI"), ("mri", "MRI"), ("US", "US"), ("DX", "Xray"),
                                        ("magnetic resonance", "MRI"), ("Colonoscopy", "Colonos"), (None, "unknown"),
                                        ("PT", "unknown"), ("", "unknown")])
def test_modality_names_aliases_and_dicom_codes(text, name):
    assert resolve_modality(text).name == name


def test_an_explicit_unknown_modality_choice_is_refused():
    with pytest.raises(PromptError, match="unknown modality 'CTT'"):
        resolve_modality("CTT", strict=True)


@pytest.mark.parametrize("path, expected", [("ct/totalseg_ct.nii.gz", "CT"), ("ct/chest_ct_aorta_crop.nii.gz", "CT"),
                                            ("mri/totalseg_mr.nii.gz", "MRI"), ("mri/brain_tumor_t1.nrrd", "MRI")])
def test_modality_guess_from_real_intensities(data_dir, path, expected):
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / path)))
    assert guess_modality(array).name == expected


def test_modality_guess_is_unknown_when_nothing_fits():
    assert guess_modality(np.full((4, 4, 4), -5.0)).name == "unknown"


def test_the_routing_modality_rule(data_dir):
    """One rule for every predictor and for training: a user's choice (strict), else the file's (lenient: a DICOM
    code without a row is unknown), else the intensities (never for pictures)."""
    image = sitk.ReadImage(str(data_dir / "ct" / "totalseg_ct.nii.gz"))
    volume = Volume(sitk.GetArrayFromImage(image), (1.0, 1.0, 1.0), np.zeros(3), np.eye(3))
    assert routing_modality(volume).name == "CT"                                   # Hounsfield units
    assert routing_modality(volume, picture=True).name == "unknown"
    assert routing_modality(volume, "mri").name == "MRI"                           # the user's choice wins
    volume.modality = "MR"
    assert routing_modality(volume).name == "MRI"                                  # the file's beats a guess
    volume.modality = "PT"
    assert routing_modality(volume).name == "unknown"                              # no row: unknown, no error
    with pytest.raises(PromptError, match="unknown modality 'PT'"):
        routing_modality(volume, "PT")                                             # typed by a user: refused


# ---------------------------------------------------------------------------------------------------- CLI
def test_categories_cli_search_and_tree(capsys):
    from medsegx_core.cli import main
    assert main(["categories", "--search", "kidney_left"]) == 0
    out = capsys.readouterr().out
    assert "'kidney_left' resolves to 'left kidney' (synonym): human body > body > abdomen > kidney" in out
    assert main(["categories", "--search", "banana"]) == 0
    assert "unknown structure 'banana'" in capsys.readouterr().out
    assert main(["categories", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert len(listing["nodes"]) == len(ALL_NODES) and listing["table_rows"] == H.table_sizes()
    assert main(["categories"]) == 0
    tree = capsys.readouterr().out.splitlines()
    cortex = tree.index("        -- cerebral cortex (Destrieux parcels)")
    assert tree.count("        -- cerebral cortex (Destrieux parcels)") == 1       # a group is listed once
    assert all(line.startswith("        ") for line in tree[cortex:cortex + 149])
