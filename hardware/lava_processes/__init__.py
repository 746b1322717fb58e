"""Lava processes of the EBM mapping (Lava finds their ProcessModels by executing the .py files of this folder:
keep it free of side effects). ``process.py`` holds the Processes, ``models.py`` their float and fixed-point
ProcessModels."""
