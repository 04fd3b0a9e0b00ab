// The per-token network layer: a full mesh of connected TCP sockets and the collective
// operations the forward pass needs (all-gather, broadcast, gather) plus length-framed messages.
//
// Connection setup and handshakes happen in Python; the connected sockets' file descriptors are
// then handed to a Mesh, which owns them (it never dup()s them and closes them when it is closed,
// destroyed, or fails). Every socket runs non-blocking and every operation drives all of its
// sockets at once with poll(), so slices of any size move without deadlock.
//
// Faults: each operation waits at most timeout_ms for every peer without progress from that peer
// (the clock restarts whenever bytes move to or from it). A failure raises NetError naming the
// peer, the operation and its label, and the cause; it also closes every connection at once, so
// the other nodes learn of it without waiting for their own timeouts. A failed or closed Mesh
// refuses every further call with NetError.
#pragma once
#include <poll.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace dllama {

class NetError : public std::runtime_error {
public:
    // peer: the node index the failure concerns, or -1 when it concerns no single peer.
    NetError(const std::string& message, int peer, std::string peer_name, std::string label)
        : std::runtime_error(message), peer_(peer), peer_name_(std::move(peer_name)), label_(std::move(label)) {}
    int peer() const { return peer_; }
    const std::string& peer_name() const { return peer_name_; }
    const std::string& label() const { return label_; }

private:
    int peer_;
    std::string peer_name_;
    std::string label_;
};

class Mesh {
public:
    static constexpr int kDefaultSpinUs = 200;

    // fds[i] is the connected socket to node i, fds[node_index] == -1. The Mesh owns every fd
    // from this call on, also when the constructor throws std::invalid_argument (it closes them).
    // peer_names[i] ("10.0.0.2:9998") appears in error messages; peer_names[node_index] is unused.
    Mesh(int node_index, int n_nodes, std::vector<int> fds, std::vector<std::string> peer_names, int timeout_ms);
    ~Mesh();
    Mesh(const Mesh&) = delete;
    Mesh& operator=(const Mesh&) = delete;

    int node_index() const { return node_index_; }
    int n_nodes() const { return n_nodes_; }
    int timeout_ms() const { return timeout_ms_.load(); }
    // Applies to the operations that start afterwards (e.g. longer while peers load weights).
    void set_timeout_ms(int timeout_ms);
    // How long an operation keeps retrying its non-blocking sends and receives before it sleeps
    // in poll(). A sync's partner usually answers within tens of microseconds; waking a thread
    // that slept costs about as much again on every sync (more in a VM). 0 sleeps at once,
    // which suits nodes that share their cores with other busy processes.
    int spin_us() const { return spin_us_.load(); }
    void set_spin_us(int spin_us);

    // buf holds n_nodes slices of slice_bytes; slice node_index is sent to every peer and every
    // peer's slice is received into its place.
    void all_gather(uint8_t* buf, size_t slice_bytes, const std::string& label);
    // The same with slice i at buf[offsets[i], offsets[i] + sizes[i]) of a buf_bytes buffer.
    void all_gather_v(uint8_t* buf, size_t buf_bytes, const std::vector<size_t>& offsets,
                      const std::vector<size_t>& sizes, const std::string& label);
    // Every node sends send[send_offsets[p], +send_sizes[p]) to each peer p and receives peer p's
    // part for it into recv[recv_offsets[p], +recv_sizes[p]) (entries for this node are unused):
    // the two halves of a reduce-scatter and an all-gather built from it.
    void all_to_all(const uint8_t* send, size_t send_bytes, const std::vector<size_t>& send_offsets,
                    const std::vector<size_t>& send_sizes, uint8_t* recv, size_t recv_bytes,
                    const std::vector<size_t>& recv_offsets, const std::vector<size_t>& recv_sizes,
                    const std::string& label);
    // root sends buf[0, n) to every peer; every other node receives it from root into buf.
    void broadcast(int root, uint8_t* buf, size_t n, const std::string& label);
    // Every node but root sends its slice to root; root receives every peer's slice into place.
    void gather(int root, uint8_t* buf, size_t buf_bytes, const std::vector<size_t>& offsets,
                const std::vector<size_t>& sizes, const std::string& label);

    // Framed messages: u32 little-endian payload length, then the payload.
    void send_message(int peer, const uint8_t* data, size_t n, const std::string& label);
    // The root (node 0) sends one framed message to every peer, all of them progressing at once in
    // one run of the transfer loop as in the collectives; each peer reads it with
    // recv_message(0, ...) or recv_message_into(0, ...). Refused (std::invalid_argument, the Mesh
    // stays usable) on any other node.
    void broadcast_message(const uint8_t* data, size_t n, const std::string& label);
    // Refuses (NetError, no allocation) a length above max_bytes.
    std::vector<uint8_t> recv_message(int peer, size_t max_bytes, const std::string& label);
    // Receives one message into buf (at most capacity bytes, else refused); returns its length.
    size_t recv_message_into(int peer, uint8_t* buf, size_t capacity, const std::string& label);

    // Waits until peer's socket has bytes to read (or was closed: the next receive reports it),
    // for at most timeout_ms (-1: no limit). Returns false on timeout. Consumes nothing and a
    // timeout is not a failure, so an idle node can wait for its next command indefinitely.
    bool wait_readable(int peer, int timeout_ms, const std::string& label);

    // Bytes on the wire since construction or the last reset, framing headers included.
    uint64_t bytes_sent() const { return bytes_sent_.load(std::memory_order_relaxed); }
    uint64_t bytes_received() const { return bytes_received_.load(std::memory_order_relaxed); }
    void reset_counters();

    // Closes every socket. Safe from another thread while an operation runs: that operation
    // wakes up, fails with NetError ("closed"), and the sockets are closed after it returns.
    void close();
    bool is_closed() const { return closing_.load(); }  // closed, or failed (which closes)

    // Called (with no lock held) when poll() is interrupted by a signal, and every 200 ms of a
    // wait (for a signal that came just before poll() began); it may throw to abort the operation
    // (the bindings use it to honour Ctrl-C). An abort leaves the Mesh failed (wait_readable: not).
    void set_interrupt_check(std::function<void()> check) { interrupt_check_ = std::move(check); }

private:
    // One peer's share of an operation: up to two byte ranges to send (header and payload) and
    // one to receive, the progress made, and when bytes last moved.
    struct Transfer {
        int peer = -1;
        const uint8_t* send_data[2] = {nullptr, nullptr};
        size_t send_len[2] = {0, 0};
        uint8_t* recv_data = nullptr;
        size_t recv_len = 0;
        size_t sent = 0;
        size_t received = 0;
        std::chrono::steady_clock::time_point last_progress;

        size_t send_total() const { return send_len[0] + send_len[1]; }
        bool send_pending() const { return sent < send_total(); }
        bool recv_pending() const { return received < recv_len; }
    };

    void check_usable(const char* op, const std::string& label) const;
    void check_peer(int peer, const char* what) const;
    void check_layout(size_t buf_bytes, const std::vector<size_t>& offsets, const std::vector<size_t>& sizes) const;
    void all_gather_locked(uint8_t* buf, size_t buf_bytes, const std::vector<size_t>& offsets,
                           const std::vector<size_t>& sizes, const std::string& label);
    // Moves every transfer to completion; on any failure closes the sockets and throws NetError.
    void run(std::vector<Transfer>& transfers, const char* op, const std::string& label);
    void run_unlocked(std::vector<Transfer>& transfers, const char* op, const std::string& label);
    [[noreturn]] void fail(const char* op, const std::string& label, int peer, const std::string& cause);
    void close_sockets();
    size_t recv_length(int peer, size_t max_bytes, const char* op, const std::string& label);

    int node_index_;
    int n_nodes_;
    std::atomic<int> timeout_ms_;
    std::atomic<int> spin_us_{kDefaultSpinUs};
    std::vector<int> fds_;
    std::vector<std::string> peer_names_;
    int wake_read_ = -1, wake_write_ = -1;  // close() from another thread wakes poll() through this pipe
    std::mutex op_mutex_;                   // one operation at a time; close() waits for it
    std::atomic<bool> closing_{false};
    std::string failure_;  // set once an operation failed: the first error's message
    std::atomic<uint64_t> bytes_sent_{0};
    std::atomic<uint64_t> bytes_received_{0};
    std::function<void()> interrupt_check_;
    // Scratch reused by every operation, so that a sync allocates nothing.
    std::vector<Transfer> transfers_;
    std::vector<pollfd> pollfds_;
    std::vector<Transfer*> poll_owners_;
    std::vector<size_t> layout_offsets_, layout_sizes_;
};

}  // namespace dllama
