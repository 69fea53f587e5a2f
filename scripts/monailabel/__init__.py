"""The MONAI Label app over this bundle (docs/monailabel.md): ``main.py`` is the app MONAI Label loads.

Its modules import ``monailabel`` (requirements-monailabel.txt); nothing else in the bundle imports them.
"""
