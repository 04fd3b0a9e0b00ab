// Mesh: collective operations over non-blocking sockets driven by poll(). See net.hpp.
#include "net.hpp"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0  // macOS: SO_NOSIGPIPE is set on the socket instead
#endif

namespace dllama {

using Clock = std::chrono::steady_clock;

namespace {

// How long a wait goes without calling the interrupt check. poll() returns early (EINTR) for a
// signal that arrives while it waits, but not for one that arrived just before it began (Python
// has noted it; nothing interrupts poll() any more): such a Ctrl-C is honoured within this time
// instead of being lost until the operation ends. The check takes the GIL, so not more often.
constexpr auto kInterruptCheckEvery = std::chrono::milliseconds(200);

int ceil_ms(Clock::duration d) {
    return d <= Clock::duration::zero()
               ? 0
               : static_cast<int>(std::chrono::ceil<std::chrono::milliseconds>(d).count());
}

std::string errno_text(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

void close_fd(int& fd) {
    if (fd >= 0) ::close(fd);
    fd = -1;
}

void set_nonblocking(int fd) {
    const int flags = fcntl(fd, F_GETFL, 0);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        throw std::invalid_argument("cannot make fd " + std::to_string(fd) + " non-blocking: " + errno_text(errno));
}

// A stream socket, or invalid_argument naming what it is instead.
void check_stream_socket(int fd) {
    int type = 0;
    socklen_t len = sizeof(type);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
        throw std::invalid_argument("fd " + std::to_string(fd) + " is not a socket: " + errno_text(errno));
    if (type != SOCK_STREAM) throw std::invalid_argument("fd " + std::to_string(fd) + " is not a stream socket");
}

void set_socket_options(int fd) {
    const int one = 1;
    // Syncs are small request-response rounds: Nagle's delay would add to every one of them.
    // Non-TCP stream sockets (AF_UNIX) have no such option; that is fine.
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0 && errno != EOPNOTSUPP &&
        errno != ENOPROTOOPT && errno != EINVAL)
        throw std::invalid_argument("cannot set TCP_NODELAY on fd " + std::to_string(fd) + ": " + errno_text(errno));
#ifdef SO_NOSIGPIPE
    setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof(one));
#endif
    // Keepalive probes find a peer whose host vanished (power, cable) while this node idles in
    // wait_readable(): about 10 s of silence, then 3 probes 5 s apart.
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
#ifdef TCP_KEEPIDLE
    const int idle_s = 10, interval_s = 5, probes = 3;
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle_s, sizeof(idle_s));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval_s, sizeof(interval_s));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof(probes));
#endif
}

std::string bytes_of(size_t done, size_t total) {
    return std::to_string(done) + " of " + std::to_string(total) + " bytes";
}

}  // namespace

Mesh::Mesh(int node_index, int n_nodes, std::vector<int> fds, std::vector<std::string> peer_names, int timeout_ms)
    : node_index_(node_index), n_nodes_(n_nodes), timeout_ms_(timeout_ms), fds_(std::move(fds)),
      peer_names_(std::move(peer_names)) {
    try {
        if (n_nodes_ < 1) throw std::invalid_argument("n_nodes must be at least 1, got " + std::to_string(n_nodes_));
        if (node_index_ < 0 || node_index_ >= n_nodes_)
            throw std::invalid_argument("node_index " + std::to_string(node_index_) + " is outside [0, " +
                                        std::to_string(n_nodes_) + ")");
        if (fds_.size() != static_cast<size_t>(n_nodes_))
            throw std::invalid_argument("fds must have n_nodes (" + std::to_string(n_nodes_) + ") entries, got " +
                                        std::to_string(fds_.size()));
        if (peer_names_.size() != static_cast<size_t>(n_nodes_))
            throw std::invalid_argument("peer_names must have n_nodes (" + std::to_string(n_nodes_) +
                                        ") entries, got " + std::to_string(peer_names_.size()));
        if (timeout_ms <= 0)
            throw std::invalid_argument("timeout_ms must be positive, got " + std::to_string(timeout_ms));
        if (fds_[node_index_] != -1)
            throw std::invalid_argument("fds[node_index] must be -1 (no socket to itself), got " +
                                        std::to_string(fds_[node_index_]));
        for (int i = 0; i < n_nodes_; i++) {
            if (i == node_index_) continue;
            if (fds_[i] < 0)
                throw std::invalid_argument("fds[" + std::to_string(i) + "] (" + peer_names_[i] +
                                            ") is not a valid fd");
            for (int j = 0; j < i; j++)
                if (fds_[j] == fds_[i])
                    throw std::invalid_argument("fds[" + std::to_string(j) + "] and fds[" + std::to_string(i) +
                                                "] are the same socket");
        }
        for (int i = 0; i < n_nodes_; i++) {
            if (i == node_index_) continue;
            check_stream_socket(fds_[i]);
            set_nonblocking(fds_[i]);
            set_socket_options(fds_[i]);
        }
        int pipe_fds[2];
        if (pipe(pipe_fds) < 0) throw std::runtime_error("cannot create the mesh's wake-up pipe: " + errno_text(errno));
        wake_read_ = pipe_fds[0];
        wake_write_ = pipe_fds[1];
        for (int fd : pipe_fds) {
            set_nonblocking(fd);
            fcntl(fd, F_SETFD, FD_CLOEXEC);
        }
    } catch (...) {
        for (int i = 0; i < static_cast<int>(fds_.size()); i++)
            if (i != node_index_) close_fd(fds_[i]);
        close_fd(wake_read_);
        close_fd(wake_write_);
        throw;
    }
}

Mesh::~Mesh() {
    close();
    close_fd(wake_read_);
    close_fd(wake_write_);
}

void Mesh::close() {
    if (!closing_.exchange(true) && wake_write_ >= 0) {
        const char byte = 1;
        ssize_t ignored = write(wake_write_, &byte, 1);  // wakes an operation blocked in poll()
        (void)ignored;
    }
    std::lock_guard<std::mutex> lock(op_mutex_);
    close_sockets();
}

void Mesh::close_sockets() {
    for (int& fd : fds_) close_fd(fd);
}

void Mesh::set_timeout_ms(int timeout_ms) {
    if (timeout_ms <= 0) throw std::invalid_argument("timeout_ms must be positive, got " + std::to_string(timeout_ms));
    timeout_ms_.store(timeout_ms);
}

void Mesh::set_spin_us(int spin_us) {
    if (spin_us < 0) throw std::invalid_argument("spin_us must be >= 0, got " + std::to_string(spin_us));
    spin_us_.store(spin_us);
}

void Mesh::reset_counters() {
    bytes_sent_.store(0, std::memory_order_relaxed);
    bytes_received_.store(0, std::memory_order_relaxed);
}

// ---- argument checks (std::invalid_argument; they leave the Mesh usable) -------------------

void Mesh::check_usable(const char* op, const std::string& label) const {
    const std::string where = std::string(op) + (label.empty() ? "" : " '" + label + "'");
    if (!failure_.empty())
        throw NetError(where + ": the mesh is unusable after an earlier error: " + failure_, -1, "", label);
    if (closing_.load()) throw NetError(where + ": the mesh is closed", -1, "", label);
}

void Mesh::check_peer(int peer, const char* what) const {
    if (peer < 0 || peer >= n_nodes_ || peer == node_index_)
        throw std::invalid_argument(std::string(what) + " " + std::to_string(peer) + " is not a peer of node " +
                                    std::to_string(node_index_) + " (nodes 0.." + std::to_string(n_nodes_ - 1) + ")");
}

void Mesh::check_layout(size_t buf_bytes, const std::vector<size_t>& offsets, const std::vector<size_t>& sizes) const {
    const size_t n = static_cast<size_t>(n_nodes_);
    if (offsets.size() != n || sizes.size() != n)
        throw std::invalid_argument("offsets and sizes must have n_nodes (" + std::to_string(n) + ") entries, got " +
                                    std::to_string(offsets.size()) + " and " + std::to_string(sizes.size()));
    for (size_t i = 0; i < n; i++) {
        if (offsets[i] > buf_bytes || sizes[i] > buf_bytes - offsets[i])
            throw std::invalid_argument("slice " + std::to_string(i) + " [" + std::to_string(offsets[i]) + ", +" +
                                        std::to_string(sizes[i]) + ") does not fit in the " +
                                        std::to_string(buf_bytes) + "-byte buffer");
        for (size_t j = 0; j < i; j++)
            if (sizes[i] && sizes[j] && offsets[i] < offsets[j] + sizes[j] && offsets[j] < offsets[i] + sizes[i])
                throw std::invalid_argument("slices " + std::to_string(j) + " and " + std::to_string(i) + " overlap");
    }
}

// ---- the engine ------------------------------------------------------------------------

void Mesh::fail(const char* op, const std::string& label, int peer, const std::string& cause) {
    std::string message = std::string(op) + (label.empty() ? "" : " '" + label + "'") + " failed: ";
    std::string name;
    if (peer >= 0) {
        name = peer_names_[peer];
        message += "node " + std::to_string(peer) + " (" + name + "): ";
    }
    message += cause;
    failure_ = message;
    closing_.store(true);
    close_sockets();  // peers see the connection drop at once instead of waiting for their timeout
    throw NetError(message, peer, name, label);
}

void Mesh::run(std::vector<Transfer>& transfers, const char* op, const std::string& label) {
    try {
        run_unlocked(transfers, op, label);
    } catch (const NetError&) {
        throw;
    } catch (...) {  // an interrupt (Ctrl-C) or an allocation failure mid-operation
        failure_ = std::string(op) + (label.empty() ? "" : " '" + label + "'") + " was interrupted";
        closing_.store(true);
        close_sockets();
        throw;
    }
}

void Mesh::run_unlocked(std::vector<Transfer>& transfers, const char* op, const std::string& label) {
    // Send and receive what the socket takes now, returning once it would block.
    auto pump_send = [&](Transfer& t) {
        while (t.send_pending()) {
            iovec iov[2];
            int n_iov = 0;
            size_t skip = t.sent;
            for (int s = 0; s < 2; s++) {
                if (skip >= t.send_len[s]) {
                    skip -= t.send_len[s];
                    continue;
                }
                iov[n_iov].iov_base = const_cast<uint8_t*>(t.send_data[s]) + skip;
                iov[n_iov].iov_len = t.send_len[s] - skip;
                skip = 0;
                n_iov++;
            }
            msghdr msg{};
            msg.msg_iov = iov;
            msg.msg_iovlen = n_iov;
            const ssize_t r = sendmsg(fds_[t.peer], &msg, MSG_NOSIGNAL);
            if (r > 0) {
                t.sent += static_cast<size_t>(r);
                t.last_progress = Clock::now();
                bytes_sent_.fetch_add(static_cast<uint64_t>(r), std::memory_order_relaxed);
            } else if (r < 0 && errno == EINTR) {
                continue;
            } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                return;
            } else {
                const int err = errno;
                fail(op, label, t.peer,
                     (err == EPIPE || err == ECONNRESET ? "connection closed by peer while sending: "
                                                        : "send failed: ") +
                         errno_text(err) + " (sent " + bytes_of(t.sent, t.send_total()) + ")");
            }
        }
    };
    auto pump_recv = [&](Transfer& t) {
        while (t.recv_pending()) {
            const ssize_t r = recv(fds_[t.peer], t.recv_data + t.received, t.recv_len - t.received, 0);
            if (r > 0) {
                t.received += static_cast<size_t>(r);
                t.last_progress = Clock::now();
                bytes_received_.fetch_add(static_cast<uint64_t>(r), std::memory_order_relaxed);
            } else if (r == 0) {
                fail(op, label, t.peer,
                     "connection closed by peer (received " + bytes_of(t.received, t.recv_len) + ")");
            } else if (errno == EINTR) {
                continue;
            } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
                return;
            } else {
                const int err = errno;
                fail(op, label, t.peer,
                     (err == ECONNRESET ? "connection reset by peer: " : "receive failed: ") + errno_text(err) +
                         " (received " + bytes_of(t.received, t.recv_len) + ")");
            }
        }
    };

    const Clock::time_point start = Clock::now();
    // First pass without poll(): small slices usually go out (and often come in) at once.
    for (Transfer& t : transfers) {
        t.last_progress = start;
        pump_send(t);
    }
    for (Transfer& t : transfers) pump_recv(t);

    // Spin: retry the non-blocking calls until everything moved or the budget is spent.
    const int spin_us = spin_us_.load();
    if (spin_us > 0) {
        const Clock::time_point spin_end = start + std::chrono::microseconds(spin_us);
        for (unsigned round = 1;; round++) {
            bool pending = false;
            for (Transfer& t : transfers) {
                if (t.send_pending()) pump_send(t);
                if (t.recv_pending()) pump_recv(t);
                pending = pending || t.send_pending() || t.recv_pending();
            }
            if (!pending || closing_.load() || Clock::now() >= spin_end) break;
            if (round % 16 == 0) std::this_thread::yield();  // give way on an oversubscribed machine
        }
    }

    const int timeout_ms = timeout_ms_.load();
    const auto timeout = std::chrono::milliseconds(timeout_ms);
    Clock::time_point next_check = start + kInterruptCheckEvery;
    std::vector<pollfd>& pfds = pollfds_;
    std::vector<Transfer*>& owners = poll_owners_;
    for (;;) {
        pfds.clear();
        owners.clear();
        Transfer* late = nullptr;  // the peer whose deadline comes first
        for (Transfer& t : transfers) {
            const short events = static_cast<short>((t.send_pending() ? POLLOUT : 0) | (t.recv_pending() ? POLLIN : 0));
            if (!events) continue;
            pfds.push_back(pollfd{fds_[t.peer], events, 0});
            owners.push_back(&t);
            if (!late || t.last_progress < late->last_progress) late = &t;
        }
        if (!late) return;
        if (closing_.load()) fail(op, label, -1, "the mesh was closed by another thread during the operation");

        const auto left = late->last_progress + timeout - Clock::now();
        if (left <= Clock::duration::zero()) {
            const Transfer& t = *late;
            std::string cause = "timeout after " + std::to_string(timeout_ms) + " ms without progress";
            if (t.recv_pending() && t.send_pending())
                cause += " (received " + bytes_of(t.received, t.recv_len) + ", sent " +
                         bytes_of(t.sent, t.send_total()) + ")";
            else if (t.recv_pending())
                cause += ": waiting for data (received " + bytes_of(t.received, t.recv_len) + ")";
            else
                cause += ": the peer is not reading (sent " + bytes_of(t.sent, t.send_total()) + ")";
            fail(op, label, t.peer, cause);
        }
        int wait_ms = static_cast<int>(std::chrono::ceil<std::chrono::milliseconds>(left).count());
        if (interrupt_check_) {
            const Clock::time_point now = Clock::now();
            if (now >= next_check) {
                interrupt_check_();
                next_check = now + kInterruptCheckEvery;
            }
            wait_ms = std::min(wait_ms, ceil_ms(next_check - now));
        }
        pfds.push_back(pollfd{wake_read_, POLLIN, 0});

        const int ready = poll(pfds.data(), static_cast<nfds_t>(pfds.size()), wait_ms);
        if (ready < 0) {
            if (errno != EINTR) fail(op, label, -1, "poll failed: " + errno_text(errno));
            if (interrupt_check_) interrupt_check_();
            continue;
        }
        if (ready == 0) continue;  // the deadline check above decides
        if (pfds.back().revents) fail(op, label, -1, "the mesh was closed by another thread during the operation");
        for (size_t i = 0; i + 1 < pfds.size(); i++) {
            const short ev = pfds[i].revents;
            if (!ev) continue;
            Transfer& t = *owners[i];
            if (ev & POLLNVAL)
                fail(op, label, t.peer, "the socket is not open (fd " + std::to_string(pfds[i].fd) + ")");
            if ((ev & (POLLOUT | POLLERR | POLLHUP)) && t.send_pending()) pump_send(t);
            if ((ev & (POLLIN | POLLERR | POLLHUP)) && t.recv_pending()) pump_recv(t);
        }
    }
}

// ---- collective operations -------------------------------------------------------------

void Mesh::all_gather(uint8_t* buf, size_t slice_bytes, const std::string& label) {
    std::lock_guard<std::mutex> lock(op_mutex_);
    layout_offsets_.resize(n_nodes_);
    layout_sizes_.assign(n_nodes_, slice_bytes);
    for (int i = 0; i < n_nodes_; i++) layout_offsets_[i] = static_cast<size_t>(i) * slice_bytes;
    all_gather_locked(buf, slice_bytes * n_nodes_, layout_offsets_, layout_sizes_, label);
}

void Mesh::all_gather_v(uint8_t* buf, size_t buf_bytes, const std::vector<size_t>& offsets,
                        const std::vector<size_t>& sizes, const std::string& label) {
    std::lock_guard<std::mutex> lock(op_mutex_);
    all_gather_locked(buf, buf_bytes, offsets, sizes, label);
}

void Mesh::all_gather_locked(uint8_t* buf, size_t buf_bytes, const std::vector<size_t>& offsets,
                             const std::vector<size_t>& sizes, const std::string& label) {
    check_layout(buf_bytes, offsets, sizes);
    check_usable("all_gather", label);
    std::vector<Transfer>& transfers = transfers_;
    transfers.clear();
    for (int p = 0; p < n_nodes_; p++) {
        if (p == node_index_) continue;
        Transfer t;
        t.peer = p;
        t.send_data[0] = buf + offsets[node_index_];
        t.send_len[0] = sizes[node_index_];
        t.recv_data = buf + offsets[p];
        t.recv_len = sizes[p];
        transfers.push_back(t);
    }
    run(transfers, "all_gather", label);
}

void Mesh::all_to_all(const uint8_t* send, size_t send_bytes, const std::vector<size_t>& send_offsets,
                      const std::vector<size_t>& send_sizes, uint8_t* recv, size_t recv_bytes,
                      const std::vector<size_t>& recv_offsets, const std::vector<size_t>& recv_sizes,
                      const std::string& label) {
    std::lock_guard<std::mutex> lock(op_mutex_);
    check_layout(send_bytes, send_offsets, send_sizes);
    check_layout(recv_bytes, recv_offsets, recv_sizes);
    check_usable("all_to_all", label);
    std::vector<Transfer>& transfers = transfers_;
    transfers.clear();
    for (int p = 0; p < n_nodes_; p++) {
        if (p == node_index_) continue;
        Transfer t;
        t.peer = p;
        t.send_data[0] = send + send_offsets[p];
        t.send_len[0] = send_sizes[p];
        t.recv_data = recv + recv_offsets[p];
        t.recv_len = recv_sizes[p];
        transfers.push_back(t);
    }
    run(transfers, "all_to_all", label);
}

void Mesh::broadcast(int root, uint8_t* buf, size_t n, const std::string& label) {
    std::lock_guard<std::mutex> lock(op_mutex_);
    if (root < 0 || root >= n_nodes_)
        throw std::invalid_argument("broadcast root " + std::to_string(root) + " is outside [0, " +
                                    std::to_string(n_nodes_) + ")");
    check_usable("broadcast", label);
    std::vector<Transfer>& transfers = transfers_;
    transfers.clear();
    for (int p = 0; p < n_nodes_; p++) {
        if (p == node_index_) continue;
        Transfer t;
        t.peer = p;
        if (node_index_ == root) {
            t.send_data[0] = buf;
            t.send_len[0] = n;
        } else if (p == root) {
            t.recv_data = buf;
            t.recv_len = n;
        } else {
            continue;
        }
        transfers.push_back(t);
    }
    run(transfers, "broadcast", label);
}

void Mesh::gather(int root, uint8_t* buf, size_t buf_bytes, const std::vector<size_t>& offsets,
                  const std::vector<size_t>& sizes, const std::string& label) {
    std::lock_guard<std::mutex> lock(op_mutex_);
    if (root < 0 || root >= n_nodes_)
        throw std::invalid_argument("gather root " + std::to_string(root) + " is outside [0, " +
                                    std::to_string(n_nodes_) + ")");
    check_layout(buf_bytes, offsets, sizes);
    check_usable("gather", label);
    std::vector<Transfer>& transfers = transfers_;
    transfers.clear();
    for (int p = 0; p < n_nodes_; p++) {
        if (p == node_index_) continue;
        Transfer t;
        t.peer = p;
        if (node_index_ == root) {
            t.recv_data = buf + offsets[p];
            t.recv_len = sizes[p];
        } else if (p == root) {
            t.send_data[0] = buf + offsets[node_index_];
            t.send_len[0] = sizes[node_index_];
        } else {
            continue;
        }
        transfers.push_back(t);
    }
    run(transfers, "gather", label);
}

bool Mesh::wait_readable(int peer, int timeout_ms, const std::string& label) {
    std::lock_guard<std::mutex> lock(op_mutex_);
    check_peer(peer, "wait_readable: peer");
    check_usable("wait_readable", label);
    const Clock::time_point now = Clock::now();
    const Clock::time_point deadline = now + std::chrono::milliseconds(timeout_ms < 0 ? 0 : timeout_ms);
    // Spin first (see spin_us()): a step usually follows the previous one within microseconds.
    const Clock::time_point spin_end = now + std::chrono::microseconds(timeout_ms == 0 ? 0 : spin_us_.load());
    Clock::time_point next_check = now + kInterruptCheckEvery;
    for (unsigned round = 1; Clock::now() < spin_end && !closing_.load(); round++) {
        pollfd pfd = {fds_[peer], POLLIN, 0};
        if (poll(&pfd, 1, 0) > 0) {
            if (pfd.revents & POLLNVAL)
                fail("wait_readable", label, peer, "the socket is not open (fd " + std::to_string(pfd.fd) + ")");
            return true;
        }
        if (round % 16 == 0) std::this_thread::yield();
    }
    for (;;) {
        int wait_ms = -1;
        if (timeout_ms >= 0) wait_ms = ceil_ms(deadline - Clock::now());
        if (interrupt_check_) {
            const Clock::time_point at = Clock::now();
            if (at >= next_check) {
                interrupt_check_();  // nothing was consumed: an interrupt leaves the mesh usable
                next_check = at + kInterruptCheckEvery;
            }
            const int slice_ms = ceil_ms(next_check - at);
            wait_ms = wait_ms < 0 ? slice_ms : std::min(wait_ms, slice_ms);
        }
        pollfd pfds[2] = {{fds_[peer], POLLIN, 0}, {wake_read_, POLLIN, 0}};
        const int ready = poll(pfds, 2, wait_ms);
        if (ready < 0) {
            if (errno != EINTR) fail("wait_readable", label, -1, "poll failed: " + errno_text(errno));
            if (interrupt_check_) interrupt_check_();  // nothing was consumed: an interrupt leaves the mesh usable
            continue;
        }
        if (pfds[1].revents || closing_.load())
            fail("wait_readable", label, -1, "the mesh was closed by another thread during the operation");
        if (pfds[0].revents & POLLNVAL)
            fail("wait_readable", label, peer, "the socket is not open (fd " + std::to_string(pfds[0].fd) + ")");
        if (pfds[0].revents) return true;
        if (ready == 0 && timeout_ms >= 0 && Clock::now() >= deadline) return false;
    }
}

// ---- framed messages -------------------------------------------------------------------

void Mesh::send_message(int peer, const uint8_t* data, size_t n, const std::string& label) {
    std::lock_guard<std::mutex> lock(op_mutex_);
    check_peer(peer, "send_message: peer");
    if (n > 0xFFFFFFFFu)
        throw std::invalid_argument("send_message: " + std::to_string(n) + " bytes do not fit the u32 length header");
    check_usable("send_message", label);
    uint8_t header[4];
    for (int i = 0; i < 4; i++) header[i] = static_cast<uint8_t>(n >> (8 * i));
    std::vector<Transfer>& transfers = transfers_;
    transfers.assign(1, Transfer{});
    transfers[0].peer = peer;
    transfers[0].send_data[0] = header;
    transfers[0].send_len[0] = 4;
    transfers[0].send_data[1] = data;
    transfers[0].send_len[1] = n;
    run(transfers, "send_message", label);
}

void Mesh::broadcast_message(const uint8_t* data, size_t n, const std::string& label) {
    std::lock_guard<std::mutex> lock(op_mutex_);
    if (node_index_ != 0)
        throw std::invalid_argument("broadcast_message: only the root (node 0) sends it; node " +
                                    std::to_string(node_index_) + " reads it with recv_message(0, ...)");
    if (n > 0xFFFFFFFFu)
        throw std::invalid_argument("broadcast_message: " + std::to_string(n) +
                                    " bytes do not fit the u32 length header");
    check_usable("broadcast_message", label);
    uint8_t header[4];
    for (int i = 0; i < 4; i++) header[i] = static_cast<uint8_t>(n >> (8 * i));
    // Every peer gets its own progress over the same header and payload, so one slow peer does
    // not hold the others back.
    std::vector<Transfer>& transfers = transfers_;
    transfers.clear();
    for (int p = 1; p < n_nodes_; p++) {
        Transfer t;
        t.peer = p;
        t.send_data[0] = header;
        t.send_len[0] = 4;
        t.send_data[1] = data;
        t.send_len[1] = n;
        transfers.push_back(t);
    }
    run(transfers, "broadcast_message", label);
}

size_t Mesh::recv_length(int peer, size_t max_bytes, const char* op, const std::string& label) {
    uint8_t header[4];
    std::vector<Transfer>& transfers = transfers_;
    transfers.assign(1, Transfer{});
    transfers[0].peer = peer;
    transfers[0].recv_data = header;
    transfers[0].recv_len = 4;
    run(transfers, op, label);
    const size_t n = static_cast<size_t>(header[0]) | static_cast<size_t>(header[1]) << 8 |
                     static_cast<size_t>(header[2]) << 16 | static_cast<size_t>(header[3]) << 24;
    if (n > max_bytes)
        fail(op, label, peer,
             "refused a message of " + std::to_string(n) + " bytes, above the limit of " + std::to_string(max_bytes) +
                 " bytes (a peer out of step, or not speaking this protocol)");
    return n;
}

std::vector<uint8_t> Mesh::recv_message(int peer, size_t max_bytes, const std::string& label) {
    std::lock_guard<std::mutex> lock(op_mutex_);
    check_peer(peer, "recv_message: peer");
    check_usable("recv_message", label);
    const size_t n = recv_length(peer, max_bytes, "recv_message", label);
    std::vector<uint8_t> out;
    try {
        out.resize(n);
    } catch (const std::bad_alloc&) {
        fail("recv_message", label, peer, "cannot allocate " + std::to_string(n) + " bytes for the message");
    }
    std::vector<Transfer>& transfers = transfers_;
    transfers.assign(1, Transfer{});
    transfers[0].peer = peer;
    transfers[0].recv_data = out.data();
    transfers[0].recv_len = n;
    run(transfers, "recv_message", label);
    return out;
}

size_t Mesh::recv_message_into(int peer, uint8_t* buf, size_t capacity, const std::string& label) {
    std::lock_guard<std::mutex> lock(op_mutex_);
    check_peer(peer, "recv_message_into: peer");
    check_usable("recv_message_into", label);
    const size_t n = recv_length(peer, capacity, "recv_message_into", label);
    std::vector<Transfer>& transfers = transfers_;
    transfers.assign(1, Transfer{});
    transfers[0].peer = peer;
    transfers[0].recv_data = buf;
    transfers[0].recv_len = n;
    run(transfers, "recv_message_into", label);
    return n;
}

}  // namespace dllama
