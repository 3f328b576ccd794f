"""The PE32+ image model: headers, sections, identity, imports, exports, relocations, unwind.

May import only the shared leaves (errors, names, collector).
"""
