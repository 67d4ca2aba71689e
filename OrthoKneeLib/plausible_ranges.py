"""Volumes (mL) of each structure over the real manual OAI label maps: the range a real knee's
reading may show (plausibility.py widens it). Generated, do not edit:
``python -m OrthoKneeLib.plausibility ../shared/data/labels-oai`` rewrites this file."""

SOURCE = '54 OAI label maps (labels-oai)'
STRUCTURES = {
    "femur": {
        "min_ml": 125.4,
        "max_ml": 267.14
    },
    "femoral_cartilage": {
        "min_ml": 7.51,
        "max_ml": 19.7
    },
    "tibia": {
        "min_ml": 80.84,
        "max_ml": 185.16
    },
    "tibial_cartilage": {
        "min_ml": 2.73,
        "max_ml": 7.21
    },
    "patella": {
        "min_ml": 11.57,
        "max_ml": 32.21
    },
    "patellar_cartilage": {
        "min_ml": 1.34,
        "max_ml": 5.54
    }
}
