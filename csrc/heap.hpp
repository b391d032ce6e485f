// Core of pars_fast._heap: an indexed d-ary min-heap of (key, tie, seq, id, object).
//
// This layer is plain C++ over borrowed PyObject pointers. It never calls into
// Python and never touches reference counts, so nothing it does can run Python
// code: the Python-facing code (request_queue.cpp, heap.cpp) does every step that
// may run Python code (attribute reads, __float__, __del__ via Py_DECREF) before
// or after a core call, never in the middle of one. That is what keeps the heap
// consistent when user code re-enters it.
//
// Layout, chosen for speed:
//   * nodes_ is the heap array. A node holds the full sort key (key, tie, seq),
//     so sifting compares contiguous memory only, plus the index of its slot.
//   * slots_ holds (id, object, hash) at a stable index; freed slots are reused.
//     pos_[slot] is the slot's heap position, in its own compact array because
//     sifting writes it for every node it moves (a random access per level).
//   * IdIndex maps an id (an exact Python str) to its slot by open addressing
//     with linear probing and backward-shift deletion, keyed by the str's own
//     cached hash, with pointer equality before a content compare.
// Every operation is O(log n) except drain and heapify (O(n)).
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace pars {

// A 4-ary heap halves the depth of a binary one; its four children (128 bytes)
// sit in two cache lines. Override with -DPARS_HEAP_ARITY=D to compare.
#ifndef PARS_HEAP_ARITY
#define PARS_HEAP_ARITY 4
#endif
inline constexpr std::size_t kArity = PARS_HEAP_ARITY;
static_assert(kArity >= 2, "PARS_HEAP_ARITY must be >= 2");
inline constexpr std::uint32_t kNoSlot = 0xFFFFFFFFu;
// Slots are 32-bit; keep one value free for kNoSlot.
inline constexpr std::size_t kMaxEntries = 0xFFFFFFF0u;

struct Node {
  double key;         // primary key (for the request queue: request.priority)
  double tie;         // secondary key (for the request queue: arrival_time)
  std::uint64_t seq;  // insertion counter: equal (key, tie) come out FIFO
  std::uint32_t slot;
};

// Strict total order: no two nodes share a seq.
inline bool node_less(const Node &a, const Node &b) noexcept {
  if (a.key != b.key) return a.key < b.key;
  if (a.tie != b.tie) return a.tie < b.tie;
  return a.seq < b.seq;
}

struct Slot {
  PyObject *id;   // exact str, one reference owned by the Python-facing object
  PyObject *obj;  // one reference owned by the Python-facing object
  Py_hash_t hash;
};

// Ids are exact str objects: their hash is cached and equality never runs Python code.
inline bool str_equal(PyObject *a, PyObject *b) noexcept {
  if (a == b) return true;
  const Py_ssize_t n = PyUnicode_GET_LENGTH(a);
  if (n != PyUnicode_GET_LENGTH(b) || PyUnicode_KIND(a) != PyUnicode_KIND(b)) return false;
  return std::memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b),
                     static_cast<std::size_t>(n) * PyUnicode_KIND(a)) == 0;
}

// Open-addressing hash table: id -> slot index. Buckets are 8 bytes: the slot
// and the low 32 bits of the hash (the probe start, and a filter before the
// string compare). Load factor <= 1/2.
class IdIndex {
 public:
  void reserve(std::size_t n) {  // room for n entries without rehashing
    std::size_t cap = buckets_.empty() ? 16 : buckets_.size();
    while (cap < 2 * n) cap *= 2;
    if (cap != buckets_.size()) rehash(cap);
  }

  std::uint32_t find(PyObject *id, Py_hash_t hash, const std::vector<Slot> &slots) const noexcept {
    if (buckets_.empty()) return kNoSlot;
    const std::uint32_t tag = static_cast<std::uint32_t>(hash);
    for (std::size_t i = tag & mask_;; i = (i + 1) & mask_) {
      const Bucket &b = buckets_[i];
      if (b.slot == kNoSlot) return kNoSlot;
      if (b.tag == tag && str_equal(slots[b.slot].id, id)) return b.slot;
    }
  }

  // Precondition: reserve(size + 1) was called and the id is not present.
  void insert(Py_hash_t hash, std::uint32_t slot) noexcept {
    const std::uint32_t tag = static_cast<std::uint32_t>(hash);
    std::size_t i = tag & mask_;
    while (buckets_[i].slot != kNoSlot) i = (i + 1) & mask_;
    buckets_[i] = Bucket{slot, tag};
  }

  // Precondition: slot is present under this hash.
  void erase(Py_hash_t hash, std::uint32_t slot) noexcept {
    std::size_t i = static_cast<std::uint32_t>(hash) & mask_;
    while (buckets_[i].slot != slot) i = (i + 1) & mask_;
    // Backward-shift deletion: pull later members of the probe run into the
    // hole when their home bucket allows it, so lookups need no tombstones.
    for (std::size_t j = (i + 1) & mask_;; j = (j + 1) & mask_) {
      const Bucket b = buckets_[j];
      if (b.slot == kNoSlot) break;
      const std::size_t home = b.tag & mask_;
      // Move b into the hole i if its home is not cyclically in (i, j].
      const bool home_in_range = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
      if (!home_in_range) {
        buckets_[i] = b;
        i = j;
      }
    }
    buckets_[i] = Bucket{kNoSlot, 0};
  }

  void reset() noexcept {
    std::vector<Bucket>().swap(buckets_);
    mask_ = 0;
  }

  std::size_t capacity() const noexcept { return buckets_.size(); }

  // Number of buckets that hold a slot (for the invariant check).
  template <class F>
  void for_each(F &&f) const {
    for (const Bucket &b : buckets_)
      if (b.slot != kNoSlot) f(b.slot, b.tag);
  }

 private:
  struct Bucket {
    std::uint32_t slot;
    std::uint32_t tag;
  };

  void rehash(std::size_t cap) {
    std::vector<Bucket> old(cap, Bucket{kNoSlot, 0});
    old.swap(buckets_);
    mask_ = cap - 1;
    for (const Bucket &b : old)
      if (b.slot != kNoSlot) insert(static_cast<Py_hash_t>(b.tag), b.slot);
  }

  std::vector<Bucket> buckets_;
  std::size_t mask_ = 0;
};

struct Taken {  // references handed back to the caller, who must release them
  PyObject *id;
  PyObject *obj;
};

class IndexedHeap {
 public:
  std::size_t size() const noexcept { return nodes_.size(); }
  bool empty() const noexcept { return nodes_.empty(); }
  const Node &top() const noexcept { return nodes_[0]; }
  const Node &node_at(std::size_t pos) const noexcept { return nodes_[pos]; }
  const Slot &slot(std::uint32_t s) const noexcept { return slots_[s]; }
  const Node &node_of(std::uint32_t s) const noexcept { return nodes_[pos_[s]]; }

  std::uint32_t find(PyObject *id, Py_hash_t hash) const noexcept { return index_.find(id, hash, slots_); }

  // Makes room for n more entries; the only step that allocates (and may throw
  // std::bad_alloc). After it, up to n append_unsifted calls cannot fail.
  void reserve_more(std::size_t n) {
    const std::size_t want = nodes_.size() + n;
    if (want > kMaxEntries) throw std::length_error("pars_fast heap: too many entries");
    if (nodes_.capacity() < want) nodes_.reserve(std::max(want, 2 * nodes_.capacity()));
    if (slots_.capacity() < want) slots_.reserve(std::max(want, 2 * slots_.capacity()));
    if (pos_.capacity() < slots_.capacity()) pos_.reserve(slots_.capacity());
    // release_slot pushes onto free_ inside noexcept code: keep it from ever reallocating.
    if (free_.capacity() < slots_.capacity()) free_.reserve(slots_.capacity());
    index_.reserve(want);
  }

  // Staged insertion. Appends the entry at the end of the heap array without
  // restoring the heap property, so a batch can be rolled back cheaply if a
  // later id turns out to be a duplicate. Returns false (and appends nothing)
  // if the id is already present. Stores the pointers; takes no references.
  bool append_unsifted(PyObject *id, Py_hash_t hash, PyObject *obj, double key, double tie) noexcept {
    if (index_.find(id, hash, slots_) != kNoSlot) return false;
    std::uint32_t s;
    const std::uint32_t pos = static_cast<std::uint32_t>(nodes_.size());
    if (!free_.empty()) {
      s = free_.back();
      free_.pop_back();
      slots_[s] = Slot{id, obj, hash};
      pos_[s] = pos;
    } else {
      s = static_cast<std::uint32_t>(slots_.size());
      slots_.push_back(Slot{id, obj, hash});  // capacity reserved: no throw
      pos_.push_back(pos);
    }
    nodes_.push_back(Node{key, tie, next_seq_++, s});
    index_.insert(hash, s);
    return true;
  }

  // Undoes the last `count` append_unsifted calls (their seq numbers stay used;
  // the order only needs seq to be increasing, not dense).
  void rollback_unsifted(std::size_t count) noexcept {
    for (; count > 0; --count) {
      const Node n = nodes_.back();
      nodes_.pop_back();
      release_slot(n.slot);
    }
  }

  // Restores the heap property after `count` append_unsifted calls.
  void commit_unsifted(std::size_t count) noexcept {
    const std::size_t n = nodes_.size();
    // Sifting each new node up, in order, equals inserting them one by one:
    // O(count log n). Rebuilding is O(n); prefer it for big batches.
    if (count > 1 && count * 4 > n) {
      heapify();
    } else {
      for (std::size_t pos = n - count; pos < n; ++pos) sift_up(pos);
    }
  }

  Taken pop() noexcept { return erase_at(0); }

  Taken erase_slot(std::uint32_t s) noexcept { return erase_at(pos_[s]); }

  void update(std::uint32_t s, double key, double tie) noexcept {
    const std::size_t pos = pos_[s];
    Node &n = nodes_[pos];
    const Node old = n;
    n.key = key;
    n.tie = tie;
    if (node_less(n, old)) sift_up(pos);
    else sift_down(pos);
  }

  // Empties the heap, then calls f(id, obj) for each former entry, handing its
  // references to f. The heap is already empty and consistent when f runs, so f
  // may release references (and so run __del__, which may re-enter the heap).
  template <class F>
  void drain(F &&f) noexcept {
    std::vector<Node> nodes;
    std::vector<Slot> slots;
    nodes.swap(nodes_);
    slots.swap(slots_);  // pos_ is not needed to release the entries
    clear_storage();
    for (const Node &n : nodes) f(slots[n.slot].id, slots[n.slot].obj);
  }

  template <class F>
  void for_each_object(F &&f) const {
    for (const Node &n : nodes_) f(slots_[n.slot].obj);
  }

  // Full consistency check for tests; returns nullptr or a description.
  const char *check() const {
    const std::size_t n = nodes_.size();
    for (std::size_t pos = 0; pos < n; ++pos) {
      const Node &node = nodes_[pos];
      if (pos > 0 && node_less(node, nodes_[(pos - 1) / kArity])) return "heap property violated";
      if (node.slot >= slots_.size()) return "node points past the slot table";
      const Slot &s = slots_[node.slot];
      if (pos_[node.slot] != pos) return "slot position is stale";
      if (s.id == nullptr || s.obj == nullptr || !PyUnicode_CheckExact(s.id)) return "slot holds a bad id/object";
      if (PyObject_Hash(s.id) != s.hash) return "slot hash does not match its id";
      if (index_.find(s.id, s.hash, slots_) != node.slot) return "id index does not find the entry";
    }
    std::size_t indexed = 0;
    bool ok = true;
    index_.for_each([&](std::uint32_t s, std::uint32_t) {
      ++indexed;
      if (s >= slots_.size() || pos_[s] == kNoSlot) ok = false;
    });
    if (!ok) return "id index points at a free slot";
    if (indexed != n) return "id index size differs from the heap size";
    if (slots_.size() != n + free_.size() || pos_.size() != slots_.size())
      return "slot table size differs from heap size plus free list";
    for (std::uint32_t s : free_)
      if (pos_[s] != kNoSlot) return "a free slot is still in use";
    return nullptr;
  }

 private:
  void release_slot(std::uint32_t s) noexcept {
    index_.erase(slots_[s].hash, s);
    slots_[s] = Slot{nullptr, nullptr, 0};
    pos_[s] = kNoSlot;
    free_.push_back(s);  // never reallocates: reserve_more keeps capacity >= slots_
  }

  Taken erase_at(std::size_t pos) noexcept {
    const std::uint32_t s = nodes_[pos].slot;
    const Taken taken{slots_[s].id, slots_[s].obj};
    const Node last = nodes_.back();
    nodes_.pop_back();
    if (pos < nodes_.size()) {
      // Fill the hole with the last node and move it whichever way it belongs.
      const Node removed = nodes_[pos];
      nodes_[pos] = last;
      pos_[last.slot] = static_cast<std::uint32_t>(pos);
      if (node_less(last, removed)) sift_up(pos);
      else sift_down_from_hole(pos);
    }
    release_slot(s);
    return taken;
  }

  void sift_up(std::size_t pos) noexcept {
    const Node moving = nodes_[pos];
    while (pos > 0) {
      const std::size_t parent = (pos - 1) / kArity;
      if (!node_less(moving, nodes_[parent])) break;
      nodes_[pos] = nodes_[parent];
      pos_[nodes_[pos].slot] = static_cast<std::uint32_t>(pos);
      pos = parent;
    }
    nodes_[pos] = moving;
    pos_[moving.slot] = static_cast<std::uint32_t>(pos);
  }

  // Index of the smallest child of pos; precondition: pos has a child.
  std::size_t min_child(std::size_t pos, std::size_t n) const noexcept {
    const std::size_t first = pos * kArity + 1;
    const std::size_t last = first + kArity < n ? first + kArity : n;
    std::size_t best = first;
    for (std::size_t c = first + 1; c < last; ++c)
      if (node_less(nodes_[c], nodes_[best])) best = c;
    return best;
  }

  // Bottom-up sift-down (Floyd): the node at pos, which came from the bottom of
  // the heap, almost always belongs near the bottom again. So walk the hole
  // down along smallest children without comparing against it (D - 1 compares
  // per level instead of D), then sift it up the few levels it may need.
  void sift_down_from_hole(std::size_t pos) noexcept {
    const std::size_t n = nodes_.size();
    const Node moving = nodes_[pos];
    while (pos * kArity + 1 < n) {
      const std::size_t best = min_child(pos, n);
      nodes_[pos] = nodes_[best];
      pos_[nodes_[pos].slot] = static_cast<std::uint32_t>(pos);
      pos = best;
    }
    nodes_[pos] = moving;
    pos_[moving.slot] = static_cast<std::uint32_t>(pos);
    sift_up(pos);
  }

  void sift_down(std::size_t pos) noexcept {
    const std::size_t n = nodes_.size();
    const Node moving = nodes_[pos];
    while (pos * kArity + 1 < n) {
      const std::size_t best = min_child(pos, n);
      if (!node_less(nodes_[best], moving)) break;
      nodes_[pos] = nodes_[best];
      pos_[nodes_[pos].slot] = static_cast<std::uint32_t>(pos);
      pos = best;
    }
    nodes_[pos] = moving;
    pos_[moving.slot] = static_cast<std::uint32_t>(pos);
  }

  void heapify() noexcept {
    const std::size_t n = nodes_.size();
    if (n < 2) return;
    for (std::size_t pos = (n - 2) / kArity + 1; pos-- > 0;) sift_down(pos);
  }

  void clear_storage() noexcept {
    index_.reset();
    // Drop the capacity too: a cleared queue should not pin its peak memory.
    std::vector<Node>().swap(nodes_);
    std::vector<Slot>().swap(slots_);
    std::vector<std::uint32_t>().swap(pos_);
    std::vector<std::uint32_t>().swap(free_);
  }

  std::vector<Node> nodes_;
  std::vector<Slot> slots_;
  std::vector<std::uint32_t> pos_;   // pos_[slot]: index into nodes_, kNoSlot when free
  std::vector<std::uint32_t> free_;
  IdIndex index_;
  std::uint64_t next_seq_ = 0;
};

}  // namespace pars
