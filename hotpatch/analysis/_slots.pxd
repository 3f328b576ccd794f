"""``FunctionAnalysis`` objects built and read from compiled code (inline, so each module has its own copy).

The class is ``hotpatch.analysis.api``'s slotted frozen dataclass, handed in by the caller: an object is made
by its type's ``tp_new`` and its slots filled through their member descriptors' C setters, which is what its
``__init__`` does without a Python call per field (the core makes a few hundred thousand on a large image).
"""

from cpython.object cimport PyObject, PyTypeObject, Py_TYPE

cdef struct Maker:
    PyTypeObject *type
    PyObject *empty                 # () for tp_new
    PyObject *descr[6]              # the member descriptors of analysis_fields(), borrowed from the class


cdef inline tuple analysis_fields():
    """The slots, in the order of the dataclass's fields (the order ``make_analysis`` takes the values in)."""
    return ("rva", "ranges", "insn_rvas", "raw_refs", "raw_tables", "fingerprint")


cdef inline int maker_of(Maker *maker, object cls, tuple empty) except -1:
    """Fill ``maker`` for ``cls``; the caller keeps ``cls`` and ``empty`` alive while it is used."""
    cdef Py_ssize_t i
    cdef tuple fields = analysis_fields()
    if not isinstance(cls, type) or getattr(cls, "__slots__", None) != fields:
        raise TypeError(f"{cls!r} is not a class with the slots {fields}")
    for i in range(6):
        descr = (<type>cls).__dict__[fields[i]]
        if type(descr).__name__ != "member_descriptor":
            raise TypeError(f"{cls.__name__}.{fields[i]} is not a slot")
        maker.descr[i] = <PyObject *>descr
    maker.type = <PyTypeObject *>cls
    maker.empty = <PyObject *>empty
    return 0


cdef inline object make_analysis(const Maker *maker, object rva, object ranges, object insn_rvas, object raw_refs,
                                 object raw_tables, object fingerprint):
    cdef object made = maker.type.tp_new(<type>maker.type, maker.empty, NULL)
    _set(maker.descr[0], made, rva)
    _set(maker.descr[1], made, ranges)
    _set(maker.descr[2], made, insn_rvas)
    _set(maker.descr[3], made, raw_refs)
    _set(maker.descr[4], made, raw_tables)
    _set(maker.descr[5], made, fingerprint)
    return made


cdef inline int _set(PyObject *descr, object target, object value) except -1:
    return Py_TYPE(<object>descr).tp_descr_set(<object>descr, target, value)


cdef inline object field_of(const Maker *maker, int index, object analysis):
    """Slot ``index`` of analysis_fields() of ``analysis`` (an object of the maker's class)."""
    return Py_TYPE(<object>maker.descr[index]).tp_descr_get(<object>maker.descr[index], analysis,
                                                           <object>maker.type)
